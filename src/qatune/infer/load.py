"""Loading a model for answering questions: base model, optional adapter, and the chat template.

Evaluation, chat and the service share it, so every answer is made with the template the model
(or its adapter) was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qatune.config import ModelConfig
    from qatune.data.templates import ChatTemplate


def inference_tokenizer(model_cfg: "ModelConfig", model: str, adapter: str | Path | None = None) -> Any:
    """The tokenizer of `model`, or the adapter's own when it saved one (it carries the training template)."""
    from qatune.models import load_tokenizer

    return load_tokenizer(model_cfg.model_copy(update={"name_or_path": model}), adapter)


def trained_template(model_cfg: "ModelConfig", model: str, adapter: str | Path | None, template_name: str) -> "ChatTemplate":
    """The chat template `model` + `adapter` answers with: the training one (data.template, else the tokenizer's)."""
    from qatune.data.templates import resolve_template

    return resolve_template(inference_tokenizer(model_cfg, model, adapter), template_name)


def load_for_inference(model_cfg: "ModelConfig", model: str, adapter: str | Path | None, template_source: str,
                       dtype: Any, device: str) -> tuple[Any, Any, "ChatTemplate"]:
    """The model (with its adapter) in eval mode, its tokenizer, and `template_source` resolved for that tokenizer."""
    import transformers

    from qatune.data.templates import resolve_template
    from qatune.models import attach_adapter, load_model

    transformers.utils.logging.disable_progress_bar()  # a weight-loading bar on every start is noise
    tokenizer = inference_tokenizer(model_cfg, model, adapter)
    tokenizer.chat_template = template_source
    template = resolve_template(tokenizer, "auto")
    loaded = load_model(model_cfg.model_copy(update={"name_or_path": model}), dtype=dtype).to(device)
    if adapter:
        loaded = attach_adapter(loaded, adapter, model)
    loaded.eval()
    return loaded, tokenizer, template

"""Loading a model for answering questions: base model, optional adapter, and the chat template.

Evaluation, chat, the service and data generation share it, so every answer is made with the
template the model (or its adapter) was trained on. The tokenizer is loaded once per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from qatune.config import ModelConfig
    from qatune.data.templates import ChatTemplate
    from qatune.runtime import Runtime


class InferenceModel(NamedTuple):
    model: Any  # in eval mode, on the runtime's device, adapter attached
    tokenizer: Any  # its chat_template is `template.source`
    template: "ChatTemplate"


def inference_tokenizer(model_cfg: "ModelConfig", adapter: str | Path | None = None) -> Any:
    """The tokenizer of the model, or the adapter's own when it saved one (it carries the training template)."""
    from qatune.models import load_tokenizer

    return load_tokenizer(model_cfg, adapter)


def load_for_inference(model_cfg: "ModelConfig", runtime: "Runtime", adapter: str | Path | None = None,
                       template_name: str = "auto", template_source: str | None = None,
                       tokenizer: Any = None, merge: bool = True) -> InferenceModel:
    """The model (with its adapter) in eval mode in `runtime.dtype(model_cfg)`, its tokenizer, and its template.

    The template is `template_name` resolved for this tokenizer (`auto`: its own, which for a qatune
    adapter is the training one), or `template_source` where given: base and tuned model of a
    comparison answer with the same template. `tokenizer`: this model's, where the caller loaded it already.

    A LoRA adapter is merged into the weights of the base loaded here (`merge`; its files are not
    touched): one adapter answers as fast as the bare base, where peft's separate adapter matmuls
    cost ~20% of the decoding speed. Other adapters (prefix tuning) stay attached; serve attaches
    several adapters by name itself and keeps them per request."""
    from qatune.compat.transformers import progress_bars_off
    from qatune.data.templates import resolve_template
    from qatune.models import attach_adapter, load_model, read_adapter

    tokenizer = tokenizer if tokenizer is not None else inference_tokenizer(model_cfg, adapter)
    if template_source is not None:
        tokenizer.chat_template, template_name = template_source, "auto"
    template = resolve_template(tokenizer, template_name)
    tokenizer.chat_template = template.source
    with progress_bars_off():  # a weight-loading bar on every start is noise
        loaded = load_model(model_cfg, runtime.dtype(model_cfg)).to(runtime.device)
    if adapter:
        loaded = attach_adapter(loaded, adapter, model_cfg.name_or_path)
        info = read_adapter(adapter)
        if merge and info is not None and info.is_lora:
            loaded = loaded.merge_and_unload()
    loaded.eval()
    return InferenceModel(loaded, tokenizer, template)

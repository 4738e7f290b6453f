"""`serve.engine: hf`: qatune's continuous batcher on transformers (CPU or GPU).

The base model is loaded once and every LoRA adapter is attached to it by name, so one batch
mixes rows of different adapters (peft's `adapter_names`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qatune.serve.batcher import ContinuousBatcher
from qatune.serve.protocol import ServedModel, template_prefix
from qatune.serve.scheduling import BatchedEngine

if TYPE_CHECKING:
    from qatune.config import ModelConfig, ServeConfig
    from qatune.runtime import Runtime


class LocalEngine(BatchedEngine):
    """transformers model with its adapters, decoded by a ContinuousBatcher in its own thread."""

    kind = "hf"

    @classmethod
    def load(cls, model_cfg: "ModelConfig", serve_cfg: "ServeConfig", models: dict[str, ServedModel],
             default_model: str, runtime: "Runtime", tokenizer: Any,
             on_step: Callable[[int, int, int], None] | None = None) -> "LocalEngine":
        """The base model on the runtime's device and dtype, with every adapter of `models` attached by name;
        `tokenizer` is the base's, loaded by the caller."""
        from qatune.infer.load import load_for_inference
        from qatune.models import attach_adapter

        base = next(iter(models.values()))
        model, tokenizer, _ = load_for_inference(model_cfg, runtime, template_source=base.template.source,
                                                 tokenizer=tokenizer)
        for served in models.values():
            if served.adapter is not None:
                model = attach_adapter(model, served.adapter, model_cfg.name_or_path, name=served.name)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else base.stop_ids[0]
        prefixes = {served.name if served.adapter else None: template_prefix(tokenizer, served)
                    for served in models.values()}
        batcher = ContinuousBatcher(model, tokenizer, serve_cfg.max_batch_size, serve_cfg.max_queue, pad_id, on_step,
                                    prefixes)
        return cls(batcher, models, default_model, getattr(model.config, "max_position_embeddings", None))

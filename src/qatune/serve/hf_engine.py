"""`serve.engine: hf`: qatune's continuous batcher on transformers (CPU or GPU).

The base model is loaded once and every LoRA adapter is attached to it by name, so one batch
mixes rows of different adapters (peft's `adapter_names`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatune.serve.batcher import ContinuousBatcher
from qatune.serve.engine_plugin import AutoFit, EngineRequest
from qatune.serve.protocol import template_prefix
from qatune.serve.scheduling import BatchedEngine

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.errors import Problem
    from qatune.runtime import Runtime

FALLBACK_RANK = 100  # auto takes hf where no faster engine is ready: it runs on every device


class LocalEngine(BatchedEngine):
    """transformers model with its adapters, decoded by a ContinuousBatcher in its own thread."""

    kind = "hf"


class HFPlugin:
    """The hf engine as a plug-in: no rules of its own, and auto's choice where no faster engine is ready."""

    name = LocalEngine.kind

    def validate(self, config: "QatuneConfig") -> list["Problem"]:
        return []

    def check_here(self, runtime: "Runtime") -> None:
        """transformers is qatune's own dependency: it runs wherever qatune does."""

    def auto_fit(self, device: str) -> AutoFit:
        return AutoFit(FALLBACK_RANK, True, "transformers serves on every device")

    def load(self, request: EngineRequest) -> LocalEngine:
        """The base model on the runtime's device and dtype, with every adapter of the request attached by name."""
        from qatune.infer.load import load_for_inference
        from qatune.models import attach_adapter

        models, serve_cfg = request.models, request.serve
        base = next(iter(models.values()))
        model, tokenizer, _ = load_for_inference(request.model, request.runtime, template_source=base.template.source,
                                                 tokenizer=request.tokenizer)
        for served in models.values():
            if served.adapter is not None:
                model = attach_adapter(model, served.adapter, request.model.name_or_path, name=served.name)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else base.stop_ids[0]
        prefixes = {served.name if served.adapter else None: template_prefix(tokenizer, served)
                    for served in models.values()}
        batcher = ContinuousBatcher(model, tokenizer, serve_cfg.max_batch_size, serve_cfg.max_queue, pad_id,
                                    request.on_step, prefixes)
        return LocalEngine(batcher, models, request.default_model,
                           getattr(model.config, "max_position_embeddings", None))


PLUGIN = HFPlugin()

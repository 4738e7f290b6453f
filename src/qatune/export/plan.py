"""What an export will do, decided by `qatune.export.recipe.plan` before a weight is read; the steps
that write (the recipe's run, the GGUF step) take it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qatune.config import QatuneConfig
from qatune.models import AdapterInfo, ModelLocation
from qatune.runtime import Runtime

if TYPE_CHECKING:
    import torch

    from qatune.eval.sets import EvalSet


@dataclass(frozen=True)
class ExportPlan:
    config: QatuneConfig
    runtime: Runtime
    output_dir: Path
    staging: Path  # written first, renamed to output_dir when complete
    deletes_existing: bool  # something is at output_dir now: deleted once the new export is complete
    adapter: AdapterInfo | None  # merged into the model; None exports the model as it is
    model: ModelLocation  # where the base's weights are
    save_dtype: "torch.dtype | None"  # None (export.dtype auto): the base model's own, known once it is loaded
    heldout: "tuple[EvalSet, ...]" = ()  # export.perplexity_data, read: the GGUF files' perplexity set

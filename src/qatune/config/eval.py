"""The `eval` section: sets, decoding, the forgetting check."""

from __future__ import annotations

from pydantic import Field

from qatune.config.base import Section, decoding_section
from qatune.config.data import SourceList

EvalDecoding = decoding_section("EvalDecoding", "for evaluation answers (greedy by default: reproducible scores)")


class EvalConfig(Section):
    """Evaluation (`qatune eval`, or after training) and the decoding of generated answers."""

    data: SourceList = Field(
        default_factory=list,
        description="Domain evaluation sets (Q&A in any data format, or multiple choice). After training, "
        "empty means data.eval_sources, else the held-out split.",
    )
    general: SourceList = Field(
        default_factory=list,
        description="General multiple-choice sets (`question`, `choices`, `answer`) for the forgetting check.",
    )
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many items per set.")
    batch_size: int = Field(
        16, ge=1, description="Questions generated together (measured on CPU: 3.3x one at a time at 8, 4.3x at 16)."
    )
    decoding: EvalDecoding = Field(default_factory=EvalDecoding, description="How the answers are generated.")
    forgetting_threshold: float = Field(
        2.0, ge=0, description="Warn when general accuracy falls by more than this many points (0-100 scale)."
    )
    side_by_side: int = Field(20, ge=0, description="Questions shown with base and tuned answers in the report.")
    after_train: bool = Field(False, description="Compare base and tuned model at the end of `qatune train`.")
    output_dir: str = Field("outputs/eval", description="Where `qatune eval` writes its reports and predictions.")

"""The `eval` section: sets, decoding, confidence, the forgetting check and the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qatune.config.base import Section, decoding_section
from qatune.config.data import SourceList
from qatune.config.synth import EndpointConfig

# Greedy (reproducible) with repetition penalty 1.1: on the default model it took the tuned answers caught in loops
# from 42% (zh) / 17% (en) to 0 and scored best of 1.0, 1.1 and 1.2 (benchmarks/sweep_defaults.py).
EvalDecoding = decoding_section("EvalDecoding", "for evaluation answers (greedy by default: reproducible scores; "
                                "repetition penalty 1.1 against loops)", repetition_penalty=1.1)

# Named decodings an evaluation can also answer with (`eval.decoding_presets`), beside eval.decoding.
# repetition_guard is the seeds' advice for small models caught in loops.
DECODING_PRESETS: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0},
    "repetition_guard": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2},
}
DecodingPreset = Literal["greedy", "repetition_guard"]
GateMetric = Literal["bleu4", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1", "perplexity", "accuracy",
                     "judge_correctness", "judge_relevance"]
JudgeDecoding = decoding_section("JudgeDecoding", "by the judge (greedy: the same verdict every run)",
                                 max_new_tokens=256)


class JudgeConfig(Section):
    """A model that grades the answers (`eval.judge.mode`): behind an OpenAI-compatible endpoint
    (eval.judge.endpoint), or a local model (eval.judge.model)."""

    mode: Literal["off", "score", "pairwise", "both"] = Field(
        "off", description="score: each answer 1-5 for correctness against the reference and for relevance; "
        "pairwise: the better of base and tuned answer (order randomised, seeded by eval.seed), as a win rate; "
        "both.",
    )
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig,
                                     description="The judge's OpenAI-compatible endpoint (url and model).")
    model: str | None = Field(None, description="A local judge model (name or folder) when eval.judge.endpoint.url "
                              "is not set; loaded after the evaluated models are freed.")
    decoding: JudgeDecoding = Field(default_factory=JudgeDecoding, description="How the judge answers.")

    @model_validator(mode="after")
    def _judge_given(self) -> JudgeConfig:
        if self.mode != "off" and not (self.endpoint.url or self.model):
            raise ValueError(f"eval.judge.mode is {self.mode} but no judge is given: set eval.judge.endpoint.url "
                             "and eval.judge.endpoint.model (an OpenAI-compatible API), or eval.judge.model (local)")
        return self


class GateConfig(Section):
    """The promotion gate (`qatune eval --compare BASE TUNED --gate`): exit non-zero, with the reason,
    when the tuned model is worse than the base (or than eval.gate.previous) or forgets."""

    enabled: bool = Field(False, description="Apply the gate after a comparison (`--gate`); a failure exits with 3.")
    metrics: dict[GateMetric, float] = Field(
        default_factory=lambda: {"token_f1": 1.0, "rougeL": 1.0},
        description="Domain metrics the tuned model must hold, each with the margin in points it may lose "
        "(perplexity: may rise) before the gate fails; a negative margin demands an improvement. Read on every domain "
        "set that has the metric.",
    )
    significant_only: bool = Field(
        True, description="Fail a metric only when its drop is also significant at eval.confidence, not noise."
    )
    forgetting: bool = Field(True, description="Fail when the forgetting check warns (a significant general drop).")
    previous: str | None = Field(
        None, description="An earlier eval output folder: the tuned model must also hold the metrics against that "
        "evaluation's tuned model (its predictions.tuned.jsonl, paired on the same items).",
    )


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
    decoding_presets: list[DecodingPreset] = Field(
        default_factory=list,
        description="Also answer with these named decodings (greedy; repetition_guard: repetition penalty 1.2, "
        "temperature 0.7, top_p 0.9) and report their metrics and degenerate answers beside eval.decoding's.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Level of the paired confidence interval on every base-vs-tuned delta; "
        "a drop counts as significant (forgetting check, gate) when its interval excludes zero.",
    )
    bootstrap_resamples: int = Field(
        2000, ge=100, description="Paired bootstrap resamples for the intervals of generation metrics and perplexity."
    )
    seed: int = Field(0, description="Seed of the bootstrap and of sampled decoding presets (same seed, same report).")
    forgetting_threshold: float = Field(
        2.0, ge=0, description="Warn when general accuracy falls by more than this many points (0-100 scale) and "
        "the fall is significant (McNemar at eval.confidence).",
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="The promotion gate (`--gate`).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="A model as judge of the answers.")
    side_by_side: int = Field(20, ge=0, description="Questions shown with base and tuned answers in the report.")
    after_train: bool = Field(False, description="Compare base and tuned model at the end of `qatune train`.")
    output_dir: str = Field("outputs/eval", description="Where `qatune eval` writes its reports and predictions.")

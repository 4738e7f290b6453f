"""Stages composed along the user's road: `qatune train` with eval.after_train trains, then
compares base and tuned. Each stage stays its own recipe; this is the caller that joins them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatune.config import QatuneConfig

if TYPE_CHECKING:
    from qatune.eval.run import EvalResult
    from qatune.runtime import Runtime
    from qatune.train.run import TrainResult


def train_and_evaluate(config: QatuneConfig, runtime: "Runtime") -> tuple["TrainResult", "EvalResult | None"]:
    """Train; with eval.after_train, then compare base and tuned into OUT/eval/ and point the train report at it."""
    from qatune.train.outputs import write_report
    from qatune.train.run import TrainCompleted, train

    result = train(config, runtime)
    if not (config.eval.after_train and isinstance(result, TrainCompleted)):
        return result, None
    import gc

    from qatune.eval.run import evaluate_after_training

    gc.collect()  # the trained model and the Trainer's cycles go before two models are loaded for evaluation
    evaluation = evaluate_after_training(config, runtime, result.output_dir, result.held_out)
    result.report.evaluation = evaluation.headline()
    write_report(result.report, result.output_dir)
    return result, evaluation

"""The evaluation stage's entry points: `evaluate` (`qatune eval`) and `evaluate_after_training`.

The work is the recipe in recipe.py (plan -> setup -> run). Evaluation after training is composed
by the caller (the train command, a script): training ends, then `evaluate_after_training`
compares the base with what training wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatune.config import QatuneConfig
from qatune.eval import recipe
from qatune.eval.recipe import EvalResult, ModelSpec, tuned_spec
from qatune.eval.sets import EvalSet
from qatune.recipe import execute
from qatune.runtime import Runtime

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["EvalResult", "ModelSpec", "evaluate", "evaluate_after_training", "held_out_set", "tuned_spec"]


def evaluate(config: QatuneConfig, specs: list[ModelSpec], sets: list[EvalSet] | None = None,
             runtime: Runtime | None = None) -> EvalResult:
    """Evaluate each model on each set (`sets`, else eval.data and eval.general); write predictions,
    review sheet and reports to eval.output_dir."""
    return execute(recipe, recipe.plan(config, runtime or Runtime.detect(), specs, sets))


def evaluate_after_training(config: QatuneConfig, runtime: Runtime, tuned_dir: str | Path,
                            held_out: "Dataset | None") -> EvalResult:
    """Base against what training wrote to `tuned_dir`, into TUNED_DIR/eval/: on eval.data, else the
    held-out split (`held_out`, the prepared validation rows), and eval.general.

    Call it on the main process once training is complete. Training checks before it starts that
    a held-out split exists when eval.data is empty, so that this finds something to compare."""
    tuned_dir = Path(tuned_dir)
    cfg = config.eval.model_copy(update={"output_dir": str(tuned_dir / "eval")})
    sets = recipe.load_sets(cfg, config.data.encoding)
    if not cfg.data and held_out is not None:
        sets.insert(0, held_out_set(held_out, cfg.max_samples))
    runtime.console.print(f"Evaluating base against tuned (eval.after_train) into {cfg.output_dir}/")
    base = config.model.name_or_path
    specs = [ModelSpec("base", base), tuned_spec(str(tuned_dir), base)]
    return evaluate(config.model_copy(update={"eval": cfg}), specs, sets, runtime)


def held_out_set(validation: "Dataset", max_samples: int | None = None) -> EvalSet:
    """The first `max_samples` prepared validation rows (messages, source, location) as the set `held_out`."""
    from qatune.data.records import Conversation
    from qatune.errors import Location
    from qatune.eval.sets import set_from_conversations

    rows = validation.select(range(min(max_samples or len(validation), len(validation))))
    conversations = [Conversation(m, source, Location(str(loc)))
                     for m, source, loc in zip(rows["messages"], rows["source"], rows["location"])]
    return set_from_conversations("held_out", conversations)

"""The evaluation stage: `evaluate(config, specs) -> EvalResult` (see run.py)."""

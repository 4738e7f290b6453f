"""The evaluation stage: `evaluate(config, specs) -> EvalResult` and `evaluate_after_training` (run.py)
over the recipe in recipe.py; base-against-tuned comparisons in compare.py, reports in report.py."""

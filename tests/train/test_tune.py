"""`qatune tune`: a 3-trial Optuna study on the tiny model starts from the config's own values, completes,
resumes after a stop (a trial left running by a killed process is run again with its parameters), and writes a
best config that loads."""

from __future__ import annotations

import json

import pytest

from qatune.config import load_config
from qatune.errors import ConfigError
from qatune.train.tune import storage_url, tune
from tests.conftest import tiny_config


def search(tmp_path, tiny_model_dir, qa_file, *overrides: str):
    return tiny_config(tmp_path, tiny_model_dir, qa_file, f"tune.output_dir={tmp_path / 'tune'}",
                       "tune.learning_rate=[1e-4, 3e-3]", "tune.num_epochs=[1, 2]", "tune.lora_rank=[4, 8]",
                       "tune.lora_alpha=[8, 16]", "tune.pruner_startup_trials=1", "train.eval_steps=2",
                       "train.report_to=none", *overrides)


@pytest.mark.slow
def test_study_completes_resumes_after_a_kill_and_writes_the_best_config(tmp_path, tiny_model_dir, qa_file) -> None:
    import optuna
    from optuna.trial import TrialState

    first = tune(search(tmp_path, tiny_model_dir, qa_file, "tune.trials=2", "method.lora_rank=8",
                        "method.lora_alpha=16", "train.num_epochs=1"))
    assert first.ran == 2 and not first.interrupted
    baseline = first.summary["trials"][0]  # the config's own values come first
    assert baseline["baseline"] == "the config's own values"
    assert {k: baseline["params"][k] for k in ("learning_rate", "lora_rank", "lora_alpha", "num_epochs")} == {
        "learning_rate": 1e-3, "lora_rank": 8, "lora_alpha": 16, "num_epochs": 1}

    # A process killed mid-trial leaves the trial RUNNING in the database, its parameters drawn.
    config = search(tmp_path, tiny_model_dir, qa_file, "tune.trials=3")
    study = optuna.load_study(study_name="qatune", storage=storage_url(config.tune))
    killed = study.ask()
    killed.suggest_float("learning_rate", 1e-4, 3e-3, log=True)
    killed.suggest_int("num_epochs", 1, 2)
    killed.suggest_float("warmup_ratio", 0.0, 0.1)
    killed.suggest_categorical("lora_rank", [4, 8])
    killed.suggest_categorical("lora_alpha", [8, 16])

    second = tune(config)
    assert second.ran == 1, "only the missing trial runs"
    trials = optuna.load_study(study_name="qatune", storage=storage_url(config.tune)).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and trials[killed.number].state == TrialState.FAIL
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 3
    retry = trials[-1]
    assert retry.user_attrs == {"retry_of": killed.number} and retry.params == killed.params

    out = tmp_path / "tune"
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary == second.summary and summary["counts"]["fail"] == 1
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"] and all(t["eval_losses"] for t in complete)
    assert (out / "optimization_history.png").stat().st_size > 10_000
    assert (out / f"trial-{best['number']}" / "adapter_model.safetensors").is_file()

    tuned = load_config(second.best_config)  # a complete config that `qatune train` accepts
    assert tuned.train.learning_rate == pytest.approx(best["params"]["learning_rate"])
    assert tuned.method.lora_rank == best["params"]["lora_rank"] and tuned.train.num_epochs == best["params"]["num_epochs"]
    assert tuned.train.output_dir == config.train.output_dir and tuned.model == config.model

    assert tune(config).ran == 0  # nothing left to do


def test_a_study_without_eval_data_or_with_fixed_steps_is_refused(tmp_path, tiny_model_dir, qa_file) -> None:
    with pytest.raises(ConfigError, match="no eval data"):
        tune(search(tmp_path, tiny_model_dir, qa_file, "data.val_size=0"))
    with pytest.raises(ConfigError, match="max_steps: 5 overrides the epochs"):
        tune(search(tmp_path, tiny_model_dir, qa_file, "train.max_steps=5"))

"""Hyper-parameter search: `tune(config, runtime) -> TuneResult`, an Optuna study of training runs.

Each trial is a `train()` run in its own folder (tune.output_dir/trial-N) with the trial's learning
rate, LoRA rank and alpha, epochs and warm-up; its value is the run's best eval loss. A new study's
trial 0 is the config's own values (those inside the search space), the baseline the others must beat.
Every evaluation is reported to Optuna, and the pruner stops a trial that does worse than earlier ones at the same step.
The study lives in a database (SQLite by default), so a stopped search resumes: a re-run counts the
complete and pruned trials and runs only the missing ones. Trials run one after another in one process;
a trial still marked running when `tune` starts was left by a stopped run, so it is marked failed and
queued again with the same parameters.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import files as atomic
from qatune.config import QatuneConfig, TuneConfig
from qatune.config.root import mask_url_password
from qatune.recipe import execute
from qatune.train.methods import LORA_METHODS

if TYPE_CHECKING:
    import optuna

    from qatune.runtime import Runtime

BEST_CONFIG_FILE = "best_config.yaml"
SUMMARY_FILE = "tune_summary.json"
HISTORY_PLOT_FILE = "optimization_history.png"
DATABASE_FILE = "study.db"
TRIAL_PREFIX = "trial-"


@dataclass
class TuneResult:
    output_dir: Path
    summary: dict[str, Any]
    best_config: Path | None  # None until a trial completes
    ran: int  # trials run by this call
    interrupted: bool = False


def storage_url(cfg: TuneConfig) -> str:
    return cfg.storage or f"sqlite:///{Path(cfg.output_dir) / DATABASE_FILE}"


@dataclass(frozen=True)
class TunePlan:
    config: QatuneConfig
    runtime: "Runtime"
    output_dir: Path
    storage: str


def plan(config: QatuneConfig, runtime: "Runtime") -> TunePlan:
    """Check the search space against the config (`qatune.config.rules`); decide the folder and the study's
    storage."""
    from qatune.config import rules

    rules.check(config, "tune")
    return TunePlan(config, runtime, Path(config.tune.output_dir), storage_url(config.tune))


def setup(plan: TunePlan) -> "optuna.Study":
    """Create or open the study (the folder and its database); queue again any trial a stopped search left running."""
    import optuna
    from optuna.trial import TrialState

    cfg = plan.config.tune
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                          n_warmup_steps=cfg.pruner_warmup_steps)
              if cfg.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=cfg.study_name, storage=plan.storage, load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                                pruner=pruner)
    if not study.get_trials(deepcopy=False):
        # A new study's first trial is the config as written (where it lies inside the search space): a
        # handful of trials then never ends on something worse than what the user had.
        study.enqueue_trial(_own_values(plan.config), user_attrs={"baseline": "the config's own values"})
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        plan.runtime.console.print(f"trial {stale.number} was left running by a stopped search: marked failed, "
                                   "queued again")
        _requeue(study, stale)
    return study


def run(plan: TunePlan, study: "optuna.Study") -> TuneResult:
    """Run the missing trials one after another, then write the best config, a summary and the history plot."""
    import optuna
    from optuna.trial import TrialState

    from qatune.train.run import TrainInterrupted, train

    config, cfg, console, out = plan.config, plan.config.tune, plan.runtime.console, plan.output_dir
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(cfg.trials - done, 0)
    console.print(f"Study {cfg.study_name!r} in {mask_url_password(plan.storage)}: {done} trial(s) done, {remaining} to run")
    ran = 0
    interrupted = False
    for _ in range(remaining):
        trial = study.ask()
        overrides = _suggest(trial, cfg, config.method.name)
        shown = ", ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in overrides.items())
        baseline = " (the config's own values)" if "baseline" in trial.user_attrs else ""
        console.print(f"[bold]trial {trial.number}[/bold]: {shown}{baseline}")
        trial_config = _with(config, {
            **overrides, "train.output_dir": str(out / f"{TRIAL_PREFIX}{trial.number}"),
            "train.overwrite_output_dir": True, "train.resume": False,
            # Step 0 would be the same base loss in every trial; previews and evaluations belong to the final run.
            "train.eval_at_start": False, "train.preview_questions": 0, "eval.after_train": False,
        })
        ran += 1
        try:
            result = train(trial_config, plan.runtime, callbacks=[_pruning_callback(trial)])
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=TrialState.PRUNED)
            console.print(f"trial {trial.number} pruned: {pruned}")
            continue
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, but the trial is run again on resume
            _requeue(study, trial)
            raise
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        if isinstance(result, TrainInterrupted):
            _requeue(study, trial)
            interrupted = True
            break
        losses = result.report.eval_loss  # None without eval data, which the plan refuses
        value = losses.best_eval_loss if losses is not None else None
        study.tell(trial, value)
        console.print(f"trial {trial.number}: best eval loss {value:.4f}")
    summary = _write_summary(study, config, out)
    best = out / BEST_CONFIG_FILE if summary["best"] else None
    return TuneResult(out, summary, best, ran, interrupted)


def tune(config: QatuneConfig, runtime: "Runtime | None" = None) -> TuneResult:
    """Run (or resume) the study until it holds tune.trials complete or pruned trials."""
    import optuna  # noqa: F401  (importing it sets up its logger, which would reset the level set below)

    from qatune.compat.process import logger_levels
    from qatune.runtime import Runtime

    decided = plan(config, runtime or Runtime.detect())
    with logger_levels({"optuna": logging.WARNING}):  # a line per trial is ours to print
        return execute(sys.modules[__name__], decided)


@dataclass(frozen=True)
class SearchedParameter:
    name: str  # Optuna's parameter name, also the tune.* field holding its space
    key: str  # the config key a trial's value overrides
    kind: str  # "log" (float, log scale), "float", "int" ([low, high]) or "choice" (a list)
    lora_only: bool = False  # searched only with method lora or qlora


SEARCHED = (
    SearchedParameter("learning_rate", "train.learning_rate", "log"),
    SearchedParameter("num_epochs", "train.num_epochs", "int"),
    SearchedParameter("warmup_ratio", "train.warmup_ratio", "float"),
    SearchedParameter("lora_rank", "method.lora_rank", "choice", lora_only=True),
    SearchedParameter("lora_alpha", "method.lora_alpha", "choice", lora_only=True),
)


def _search_space(cfg: TuneConfig, method: str) -> list[tuple[SearchedParameter, Any]]:
    """The parameters this study searches, each with its space (a null space keeps the config's value)."""
    return [(parameter, getattr(cfg, parameter.name)) for parameter in SEARCHED
            if getattr(cfg, parameter.name) and (method in LORA_METHODS or not parameter.lora_only)]


def _suggest(trial: "optuna.Trial", cfg: TuneConfig, method: str) -> dict[str, Any]:
    """This trial's values, keyed by the config key they override."""
    values: dict[str, Any] = {}
    for parameter, space in _search_space(cfg, method):
        if parameter.kind == "choice":
            values[parameter.key] = trial.suggest_categorical(parameter.name, space)
        elif parameter.kind == "int":
            values[parameter.key] = trial.suggest_int(parameter.name, *space)
        else:
            values[parameter.key] = trial.suggest_float(parameter.name, *space, log=parameter.kind == "log")
    return values


def _own_values(config: QatuneConfig) -> dict[str, Any]:
    """The config's values of the searched parameters that lie inside the search space (the sampler draws the rest)."""
    values: dict[str, Any] = {}
    for parameter, space in _search_space(config.tune, config.method.name):
        section, field = parameter.key.split(".")
        value = getattr(getattr(config, section), field)
        if parameter.kind == "choice":
            inside = value in space
        else:
            inside = space[0] <= value <= space[1] and (parameter.kind != "int" or float(value).is_integer())
        if inside:
            values[parameter.name] = int(value) if parameter.kind == "int" else value
    return values


def _with(config: QatuneConfig, values: dict[str, Any]) -> QatuneConfig:
    """A copy of the config with `section.key` values set, validated like a loaded config."""
    raw = config.model_dump(mode="json")
    for key, value in values.items():
        section, name = key.split(".")
        raw[section][name] = value
    return QatuneConfig.model_validate(raw)


def _requeue(study: "optuna.Study", trial: Any) -> None:
    """Mark a stopped trial failed and queue its parameters again: the next run repeats it from the start."""
    from optuna.trial import TrialState

    params = trial.params
    study.tell(trial.number, state=TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={"retry_of": trial.number})


def _pruning_callback(trial: "optuna.Trial") -> Any:
    """A TrainerCallback that reports each eval loss to the trial and stops a trial the pruner rejects."""
    import optuna
    from transformers import TrainerCallback

    class ReportToOptuna(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            trial.report(loss, state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval loss {loss:.4f} at step {state.global_step}")

    return ReportToOptuna()


def _write_summary(study: "optuna.Study", config: QatuneConfig, out: Path) -> dict[str, Any]:
    """tune_summary.json, best_config.yaml (a complete config `qatune train` takes) and the history plot."""
    from optuna.trial import FixedTrial, TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    summary: dict[str, Any] = {
        "study": study.study_name, "storage": mask_url_password(storage_url(config.tune)), "direction": "minimize",
        "objective": "best eval loss of the run",
        "counts": {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "trials": [{
            "number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
            "eval_losses": {str(step): loss for step, loss in sorted(t.intermediate_values.items())},
            "seconds": t.duration.total_seconds() if t.duration else None, **t.user_attrs,
        } for t in trials],
        "best": None,
    }
    files = [SUMMARY_FILE]
    if best is not None:
        # The best trial's values through the same mapping as its run (a FixedTrial replays its suggestions).
        best_config = _with(config, _suggest(FixedTrial(best.params), config.tune, config.method.name))
        header = (f"# Best of {len(complete)} complete trial(s) of study {study.study_name!r}: trial {best.number}, "
                  f"best eval loss {best.value:.4f}.\n# Train it with: qatune train {out / BEST_CONFIG_FILE}\n")
        atomic.write_text(out / BEST_CONFIG_FILE, header + best_config.to_yaml())  # secrets withheld
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run": str(out / f"{TRIAL_PREFIX}{best.number}")}
        _plot_history(study, out / HISTORY_PLOT_FILE)
        files += [BEST_CONFIG_FILE, HISTORY_PLOT_FILE]
    summary["files"] = files
    atomic.write_json(out / SUMMARY_FILE, summary)
    return summary


def _plot_history(study: "optuna.Study", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    with warnings.catch_warnings():  # the matplotlib backend of optuna.visualization is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name="best eval loss")
    ax.figure.set_size_inches(7, 4)
    ax.figure.tight_layout()
    with atomic.atomic_path(path) as temporary:
        ax.figure.savefig(temporary, dpi=100)
    plt.close(ax.figure)

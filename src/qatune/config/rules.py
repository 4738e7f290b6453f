"""Rules that read more than one config section, run by `load_config` after the sections themselves
validate: each gives a `Problem` (key, what is wrong, the fix) and `load_config` reports them with the
field errors in one message, before anything is read from disk. The plug-ins in use (the training
stage, the serving engine, the distributed back-end) add their own through `validate(config)`.

A rule runs when every section it reads is valid on its own: a config with a bad `data.max_length`
still hears about a LoRA student cut by `distill.student_layers`. Rules of one command (`qatune tune`)
run only when that command loads the config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from qatune import plugins
from qatune.errors import Problem

if TYPE_CHECKING:
    from qatune.config.root import QatuneConfig

Rule = Callable[["QatuneConfig"], list[Problem]]


def _has_eval_data(config: "QatuneConfig") -> bool:
    return bool(config.data.eval_sources) or config.data.val_size != 0


def early_stopping_needs_eval_data(config: "QatuneConfig") -> list[Problem]:
    if config.train.early_stopping_patience and not _has_eval_data(config):
        return [Problem("train.early_stopping_patience", "needs eval data, and this dataset has none",
                        "set data.val_size above 0 or add data.eval_sources")]
    return []


def evaluation_after_training_has_data(config: "QatuneConfig") -> list[Problem]:
    if config.eval.after_train and not config.eval.data and not _has_eval_data(config):
        return [Problem("eval.after_train", "has nothing to evaluate: no eval.data and no held-out split",
                        "set eval.data, data.eval_sources or data.val_size above 0")]
    return []


def plugins_in_use(config: "QatuneConfig") -> list[Problem]:
    """The rules of the training stage, the distributed back-end and the serving engine the config names."""
    used = [plugins.load("stage", config.train.stage), plugins.load("distributed", config.train.distributed)]
    if config.serve.engine in plugins.names("engine"):  # `auto` is decided on the machine
        used.append(plugins.load("engine", config.serve.engine))
    return [problem for plugin in used for problem in plugin.validate(config)]


def tune_has_eval_loss_to_minimise(config: "QatuneConfig") -> list[Problem]:
    data, cfg, problems = config.data, config.tune, []
    if data.val_size == 0 and not data.eval_sources:
        problems.append(Problem("data.val_size", "tune minimises the eval loss, and this config has no eval data",
                                "set data.val_size above 0 or add data.eval_sources"))
    if cfg.num_epochs and config.train.max_steps > 0:
        problems.append(Problem("train.max_steps", f"{config.train.max_steps} overrides the epochs tune.num_epochs "
                                "searches", "set train.max_steps=-1, or tune.num_epochs=null to keep the epochs "
                                "fixed"))
    return problems


RULES: tuple[Rule, ...] = (early_stopping_needs_eval_data, evaluation_after_training_has_data, plugins_in_use)
COMMAND_RULES: dict[str, tuple[Rule, ...]] = {"tune": (tune_has_eval_loss_to_minimise,)}


class SectionInvalid(Exception):
    """A rule read a section that did not validate: the rule is skipped (that section's own error is reported)."""


class ValidSections:
    """The sections of a config that validated on their own; reading another raises SectionInvalid."""

    def __init__(self, sections: dict[str, Any]):
        self._sections = sections

    def __getattr__(self, name: str) -> Any:
        try:
            return self._sections[name]
        except KeyError:
            raise SectionInvalid(name) from None


def problems(config: "QatuneConfig | ValidSections", command: str | None = None) -> list[Problem]:
    """Every problem the rules find (those of `command` too), each rule whose sections are valid."""
    return [problem for rule in _rules(command) for problem in _run(rule, config)]


def check(config: "QatuneConfig", command: str) -> None:
    """Raise the rules' problems for a config loaded without `command` before it runs that command (a recipe
    called from Python, not the CLI)."""
    from qatune.errors import ConfigError

    found = problems(config, command)
    if found:
        raise ConfigError([str(p) for p in found])


def _rules(command: str | None) -> Iterator[Rule]:
    yield from RULES
    yield from COMMAND_RULES.get(command or "", ())


def _run(rule: Rule, config: Any) -> list[Problem]:
    try:
        return rule(config)
    except SectionInvalid:
        return []

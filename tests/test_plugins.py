"""The plug-in table: every entry imports as its kind's type, the schema's choices are the table's, and each
stage declares a section the config has."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from qatune import plugins
from qatune.config import QatuneConfig, SourceConfig, load_config
from qatune.data.formats import RecordFormat
from qatune.errors import ConfigError
from qatune.train.distributed import DistributedBackend
from qatune.train.stages.base import TrainingStage

REPO = Path(__file__).resolve().parents[1]
KIND_TYPES = {"stage": TrainingStage, "format": RecordFormat, "distributed": DistributedBackend}


@pytest.mark.parametrize("kind", sorted(KIND_TYPES))
def test_every_plugin_imports_as_its_kind_under_its_own_name(kind) -> None:
    for name, plugin in plugins.loaded(kind).items():
        assert isinstance(plugin, KIND_TYPES[kind]), (kind, name)
        assert plugin.name == name


def test_the_schemas_choices_are_the_tables() -> None:
    train = QatuneConfig.model_fields["train"].annotation.model_fields
    assert typing.get_args(train["stage"].annotation) == plugins.names("stage")
    assert typing.get_args(train["distributed"].annotation) == plugins.names("distributed")
    assert typing.get_args(SourceConfig.model_fields["format"].annotation) == ("auto", *plugins.names("format"))


def test_each_stage_reads_a_section_the_config_has() -> None:
    for name, stage in plugins.loaded("stage").items():
        assert stage.section is None or stage.section in QatuneConfig.model_fields, name


def test_an_unknown_plugin_is_named_with_the_known_ones() -> None:
    with pytest.raises(KeyError, match="no stage plug-in 'rlhf'; known: sft, pt"):
        plugins.load("stage", "rlhf")


def test_field_errors_and_rules_across_sections_are_reported_together() -> None:
    """A bad data.max_length does not hide that a LoRA method cannot save a student cut to 15 layers."""
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "examples" / "demo.yaml", ["train.stage=distill", "distill.teacher=default",
                                           "distill.student_layers=15", "data.max_length=-1"])
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("data.max_length (line ")
    assert problems[1].startswith("distill.student_layers: makes a new, smaller model, and method lora")
    assert "use method.name=full" in problems[1]


def test_config_show_reports_both_problems_and_exits_2_before_reading_weights() -> None:
    run = subprocess.run([sys.executable, "-m", "qatune", "config", "show", str(REPO / "examples" / "demo.yaml"),
                          "train.stage=distill", "distill.teacher=default", "distill.student_layers=15",
                          "data.max_length=-1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "2 problems in the config" in run.stderr + run.stdout
    assert "distill.student_layers" in run.stderr + run.stdout and "data.max_length" in run.stderr + run.stdout


def test_a_stage_module_is_the_only_place_that_spells_its_name() -> None:
    """kto was moved into that shape: outside its module, only the table names it."""
    found = subprocess.run(["git", "grep", "-n", "-e", '"kto"', "-e", "'kto'", "--", "src"], capture_output=True,
                           text=True, cwd=REPO).stdout.splitlines()
    assert found and {line.split(":")[0] for line in found} == {"src/qatune/plugins.py",
                                                                 "src/qatune/train/stages/kto.py"}, found

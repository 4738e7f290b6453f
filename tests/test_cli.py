"""The CLI is thin: config show, config errors without tracebacks, fast --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qatune.cli import main, parse_args
from qatune.cli.common import config_from, split_args
from tests.conftest import REPO

DEMO = str(REPO / "examples" / "demo.yaml")


def test_config_show_prints_resolved_yaml(capsys) -> None:
    assert main(["config", "show", "data.max_length=300", "model=default"]) == 0
    out = capsys.readouterr().out
    assert "max_length: 300" in out and "name_or_path: default" in out


def test_config_error_is_one_message_and_exit_2(capsys) -> None:
    assert main(["config", "show", "data.max_lenght=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 problem") and "did you mean 'max_length'" in err
    assert "Traceback" not in err


def test_help_answers_without_heavy_imports() -> None:
    code = "import sys; from qatune.cli import build_parser; build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


@pytest.mark.parametrize("argv", [
    ["train", DEMO, "--nproc", "2", "train.max_steps=3"],
    ["train", "--nproc", "2", DEMO, "train.max_steps=3"],
    ["train", "train.max_steps=3", "--nproc", "2", DEMO],
])
def test_flags_and_overrides_go_in_any_order(argv) -> None:
    ns = parse_args(argv)
    assert ns.nproc == 2
    config = config_from(ns)
    assert config.train.max_steps == 3 and config.train.output_dir == "outputs/demo/lora"  # the demo file was read


def test_a_flag_never_drops_an_override(tmp_path) -> None:
    general = str(tmp_path / "mcq.jsonl")
    for argv in (["eval", "model.dtype=float32", "--model", "default", "--general", general],
                 ["eval", "--model", "default", "model.dtype=float32", "--general", general],
                 ["eval", "model=default", "model.dtype=float32", "--general", general]):
        config = config_from(parse_args(argv))
        assert (config.model.name_or_path, config.model.dtype) == ("default", "float32"), argv
        assert [s.path for s in config.eval.general] == [general]
    config = config_from(parse_args(["train", DEMO, "--model", "default", "train.max_steps=1"]))
    assert config.model.name_or_path == "default" and config.train.max_steps == 1


def test_generate_takes_the_question_after_config_and_overrides(capsys) -> None:
    ns = parse_args(["generate", DEMO, "serve.decoding.temperature=0", "--model", "default",
                     "What is a fever?"])
    plain, overrides = split_args(ns.args)
    assert plain == [DEMO, "What is a fever?"] and overrides == ["serve.decoding.temperature=0"]
    assert main(["generate", "a.yaml", "b.yaml", "question?"]) == 2
    assert "at most one CONFIG" in capsys.readouterr().err

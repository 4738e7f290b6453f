"""The CLI is thin: config show, config errors without tracebacks, fast --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qatune.cli import build_parser, main, parse_args
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


def test_the_command_table_names_real_keys_choices_and_functions() -> None:
    from typing import Literal, get_origin

    from qatune.cli import _run_function
    from qatune.commands import COMMANDS
    from qatune.config.schema import field_at

    for command in COMMANDS.values():
        assert callable(_run_function(command.run)), command.name
        for flag in command.flags:
            if flag.key:
                assert field_at(tuple(flag.key.split("."))) is not None, (command.name, flag.name, flag.key)
            if flag.choices_of:
                annotation = field_at(tuple(flag.choices_of.split("."))).annotation
                assert Literal in {get_origin(a) for a in (annotation, *annotation.__args__)}, flag.choices_of


def test_choices_are_the_schemas() -> None:
    from typing import get_args

    from qatune import plugins
    from qatune.config import QatuneConfig
    from qatune.config.data import SOURCE_FORMATS

    def choices(argv: list[str], dest: str) -> tuple:
        parser = build_parser()
        sub = parser._subparsers._group_actions[0].choices[argv[0]]
        for word in argv[1:]:
            sub = sub._subparsers._group_actions[0].choices[word]
        return tuple(next(a for a in sub._actions if a.dest == dest).choices)

    assert choices(["serve"], "engine") == ("auto", *plugins.names("engine"))
    assert choices(["data", "check"], "format") == tuple(SOURCE_FORMATS)
    export = QatuneConfig.model_fields["export"].annotation.model_fields
    assert choices(["export"], "gguf") == get_args(get_args(export["gguf"].annotation)[0])
    assert choices(["export"], "quantize") == get_args(get_args(export["quantize"].annotation)[0])
    with pytest.raises(SystemExit):
        parse_args(["serve", "--engine", "nonesuch"])


def test_command_line_parses_back_to_its_arguments() -> None:
    """Every command of the table, every flag given: the CLI reads `command_line` back to the same values."""
    from qatune.cli import _SchemaChoices
    from qatune.commands import COMMANDS, command_line

    for name, command in COMMANDS.items():
        flags, positionals = {}, []
        for flag in command.flags:
            if flag.action == "store_true":
                flags[flag.dest] = True
            elif flag.action == "append":
                flags[flag.dest] = ["one=a.jsonl", "two.jsonl"] if flag.dest == "adapter" else ["a.jsonl", "b.jsonl"]
            elif flag.nargs:
                flags[flag.dest] = [f"v{i}" for i in range(flag.nargs)]
            elif flag.type is int:
                flags[flag.dest] = 3
            elif flag.choices_of:
                flags[flag.dest] = _SchemaChoices(flag.choices_of)[-1]
            else:
                flags[flag.dest] = f"{flag.dest}-value"
        takes_overrides = any(p.name == "args" for p in command.positionals)
        positionals = ["file.jsonl"] * len(command.positionals)
        overrides = ["train.max_steps=3"] if takes_overrides else []
        ns = parse_args(command_line(name, *positionals, overrides=overrides, **flags))
        assert [ns.command, *([ns.action] if " " in name else [])] == name.split()
        for dest, value in flags.items():
            assert getattr(ns, dest) == value, (name, dest)
        if takes_overrides:
            assert ns.args == [*positionals, *overrides], name
        elif command.positionals:
            assert getattr(ns, command.positionals[0].name) == positionals[0], name

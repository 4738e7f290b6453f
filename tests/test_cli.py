"""The CLI is thin: config show, config errors without tracebacks, fast --help."""

from __future__ import annotations

import subprocess
import sys

from qatune.cli import main


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

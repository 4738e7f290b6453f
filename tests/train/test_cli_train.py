"""`qatune train --model M --data D` works without a config file; errors are one line, no traceback."""

from __future__ import annotations

import json

from qatune.cli import main
from qatune.train.run import _is_out_of_memory


def test_train_without_a_config_file(tmp_path, tiny_model_dir, qa_file, capsys) -> None:
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(qa_file), f"data.output_dir={tmp_path / 'd'}",
                 f"train.output_dir={tmp_path / 'r'}", "train.max_steps=1", "train.report_to=none",
                 "train.preview_questions=1", "eval.decoding.max_new_tokens=4", "data.clean.near_dedup=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "trainable parameters" in out and "base vs tuned" in out and "Wrote" in out
    report = json.loads((tmp_path / "r" / "train_report.json").read_text())
    assert report["global_step"] == 1 and report["model"] == str(tiny_model_dir)


def test_train_error_is_one_message(tmp_path, tiny_model_dir, qa_file, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec  # qlora where bitsandbytes is not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(qa_file), "method.name=qlora",
                 f"train.output_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: method qlora needs the bitsandbytes package") and "Traceback" not in err
    assert "qatune[qlora]" in err and not (tmp_path / "r").exists()


def test_out_of_memory_is_recognised_on_cpu_and_gpu() -> None:
    assert _is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not _is_out_of_memory(RuntimeError("shape mismatch"))

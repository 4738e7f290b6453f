"""Issue 19, items 5 and 6 for the train and tune stages: an output folder's earlier files, the model's
own folder and the data folder are never deleted without the say-so (or at all); every file is
written whole or not at all; no secret reaches a file a run writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qatune import files
from qatune.errors import DataError
from qatune.train.checkpoints import decide_output_dir, earlier_outputs
from qatune.train.run import TrainError, train
from tests.conftest import REPO, tiny_config

KEY = "sk-qatune-test-7f3a9c21e8"  # a value that must appear in no file


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_if_loaded(monkeypatch) -> None:
    """Loading a model or tokenizer, or deleting an earlier run, fails the test: a refusal comes first."""
    def boom(*args, **kwargs):
        raise AssertionError("reached setup: the plan should have refused")

    monkeypatch.setattr("qatune.train.methods.load_for_method", boom)
    monkeypatch.setattr("qatune.models.load_tokenizer", boom)
    monkeypatch.setattr("qatune.train.run.delete_earlier_run", boom)


def test_weights_without_checkpoints_survive_a_fresh_run_and_are_named(tmp_path, tiny_model_dir, qa_file,
                                                                       monkeypatch) -> None:
    out = tmp_path / "run"
    (out / "runs" / "old").mkdir(parents=True)
    (out / "runs" / "old" / "events.out.tfevents.1").write_bytes(b"logs")
    for name in ("model.safetensors", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).write_bytes(os.urandom(64))
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = snapshot(out)
    fail_if_loaded(monkeypatch)
    with pytest.raises(TrainError, match="already holds a run") as info:
        train(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=1"))
    for name in ("model.safetensors", "adapter_model.safetensors", "adapter_config.json", "runs/"):
        assert name in str(info.value)
    assert "overwrite_output_dir" in str(info.value)
    assert snapshot(out) == before


def test_overwrite_lists_every_earlier_output_and_nothing_else(tmp_path, tiny_model_dir, qa_file) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "tokenizer.json", "train_report.json", "notes.txt"):
        (out / name).write_text("x", encoding="utf-8")
    (out / "checkpoint-3").mkdir()
    decision = decide_output_dir(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.overwrite_output_dir=true"), 1)
    assert sorted(p.name for p in decision.replaces) == ["checkpoint-3", "model-00001-of-00002.safetensors",
                                                         "tokenizer.json", "train_report.json"]


def test_the_model_folder_is_never_the_output_folder(tmp_path, tiny_model_dir, qa_file, monkeypatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = snapshot(model)
    fail_if_loaded(monkeypatch)
    for extra in ((), ("train.overwrite_output_dir=true",)):
        config = tiny_config(tmp_path, model, qa_file, f"train.output_dir={model}", *extra)
        with pytest.raises(TrainError, match="folder of the model this run loads"):
            train(config)
    assert snapshot(model) == before

    # An adapter folder as the model: neither it nor the base it names may be the output.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                             str(model)}), encoding="utf-8")
    for target in (adapter, model):
        with pytest.raises(TrainError, match="folder of the model"):
            train(tiny_config(tmp_path, adapter, qa_file, f"train.output_dir={target}",
                              "train.overwrite_output_dir=true"))
    assert snapshot(model) == before

    # Starting over in a run folder whose checkpoint is the model would delete that checkpoint.
    run = tmp_path / "run"
    shutil.copytree(model, run / "checkpoint-4")
    with pytest.raises(TrainError, match="would remove .*checkpoint-4"):
        train(tiny_config(tmp_path, run / "checkpoint-4", qa_file, "train.overwrite_output_dir=true"))
    assert snapshot(run / "checkpoint-4") == before


def test_a_data_folder_with_user_files_is_refused_before_the_earlier_run_is_deleted(
        tmp_path, tiny_model_dir, qa_file, monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_report.json").write_text("{}", encoding="utf-8")
    fail_if_loaded(monkeypatch)
    with pytest.raises(DataError, match="not a qatune data folder") as info:
        train(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.overwrite_output_dir=true"))
    assert "train.jsonl" in str(info.value) and str(data) in str(info.value)
    assert (tmp_path / "run" / "train_report.json").is_file() and (data / "train.jsonl").is_file()


def test_a_failed_writer_leaves_the_old_file_and_no_half_file(tmp_path) -> None:
    from qatune.train.outputs import write_report
    from qatune.train.report import TrainReport

    out = tmp_path / "run"
    out.mkdir()
    (out / "train_report.json").write_text('{"old": true}', encoding="utf-8")
    with pytest.raises(TypeError):
        write_report(TrainReport(final_train_loss=1.0, stage_metrics={"bad": object()}), out)  # json fails half way through
    assert json.loads((out / "train_report.json").read_text(encoding="utf-8")) == {"old": True}
    assert sorted(p.name for p in out.iterdir()) == ["train_report.json"]

    with pytest.raises(RuntimeError), files.atomic_path(out / "loss_curve.png") as temporary:
        temporary.write_bytes(b"\x89PNG half")
        raise RuntimeError("the plot failed")
    assert sorted(p.name for p in out.iterdir()) == ["train_report.json"]
    assert files.temporary_name(out / "loss_curve.png").suffix == ".png"  # matplotlib picks the format from it


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path) -> None:
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n", encoding="utf-8")
    writer = ("import sys, time; from qatune import files\n"
              "with files.atomic_path(sys.argv[1]) as t, open(t, 'w') as f:\n"
              "    f.write('new: ' * 1000); f.flush(); print('half', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.read_text(encoding="utf-8") == "old: 1\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(name.startswith(".config.tmp-") for name in leftovers)  # hidden, never read as the file


def grep_key(*folders: Path) -> list[str]:
    """Files under `folders` whose bytes contain the key."""
    return [str(p) for folder in folders for p in folder.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


@pytest.mark.slow
def test_no_api_key_in_any_file_a_run_writes_and_resume_still_works(tmp_path, tiny_model_dir, qa_file) -> None:
    from qatune.config import load_config

    base = ("train.max_steps=2", "train.save_steps=1", f"serve.api_key={KEY}")
    first = train(tiny_config(tmp_path, tiny_model_dir, qa_file, *base))
    out, data = first.output_dir, tmp_path / "data"
    assert (out / "config.yaml").is_file() and (data / "config.yaml").is_file()
    assert grep_key(out, data) == []
    saved = (out / "config.yaml").read_text(encoding="utf-8")
    assert "serve.api_key" in saved.splitlines()[0]  # named as withheld
    assert load_config(out / "config.yaml").serve.api_key is None
    assert not list(out.glob("*.bin")), "no pickled training_args.bin beside the weights"
    # RUN_OUTPUTS knows every file a run writes: a fresh run into this folder refuses, naming all of them.
    assert sorted(out.iterdir()) == earlier_outputs(out)

    resumed = train(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=3", "train.save_steps=1",
                                f"serve.api_key={KEY}", "train.resume=true"))
    assert resumed.report.resumed_from and resumed.report.global_step == 3
    assert grep_key(out, data) == []


@pytest.mark.slow
def test_no_api_key_in_any_file_tune_writes(tmp_path, tiny_model_dir, qa_file) -> None:
    from qatune.train.tune import tune

    config = tiny_config(tmp_path, tiny_model_dir, qa_file, f"tune.output_dir={tmp_path / 'tune'}", "tune.trials=1",
                         "tune.num_epochs=null", "tune.lora_rank=[4]", "train.max_steps=2", "train.eval_steps=1",
                         f"serve.api_key={KEY}")
    result = tune(config)
    assert result.best_config is not None and result.best_config.is_file()
    assert grep_key(tmp_path / "tune", tmp_path / "data") == []
    assert config.serve.api_key == KEY  # the config in memory keeps it


def test_tune_summary_masks_a_storage_password() -> None:
    from qatune.config.root import mask_url_password

    assert mask_url_password("postgresql://bob:hunter2@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert mask_url_password("sqlite:///outputs/tune/study.db") == "sqlite:///outputs/tune/study.db"


def test_the_train_report_reads_back_what_it_wrote_and_a_file_older_qatune_wrote(tmp_path) -> None:
    from qatune.reports import SCHEMA_VERSION, read_report, write_report
    from qatune.train.report import EvalLossSummary, TrainReport

    path = tmp_path / "train_report.json"
    report = TrainReport(method="lora", global_step=3, eval_loss=EvalLossSummary(None, None, 1.0, 2.7, 2, 1.5, 4.5, 3),
                         stage_metrics={"final_eval_reward_accuracy": 1.0})
    write_report(report, path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    # The stage's figures and the eval losses stand at the top level, as the keys readers know.
    assert saved["schema_version"] == SCHEMA_VERSION and saved["final_eval_reward_accuracy"] == 1.0
    assert saved["best_step"] == 2 and saved["initial_eval_loss"] is None
    assert not {"stage_metrics", "eval_loss", "evaluation"} & set(saved)
    assert read_report(TrainReport, path) == report
    # Before schema_version (and, older still, loss_history): read with the defaults.
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("schema_version", "loss_history")}),
                    encoding="utf-8")
    assert read_report(TrainReport, path) == report
    write_report(TrainReport(), path)  # a run without eval data writes no eval-loss key
    assert "final_eval_loss" not in json.loads(path.read_text(encoding="utf-8"))

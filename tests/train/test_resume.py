"""Resume: a run killed with SIGKILL loses at most one save interval and, resumed, ends with the same
loss as an uninterrupted run; Ctrl-C saves a checkpoint and exits cleanly. The killed runs are real
`qatune train` processes. Preference (TRL's trainers) and distillation runs resume from their checkpoint to the
same loss as well."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from qatune.train.run import complete_checkpoints, train
from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.slow

STEPS = 40
RUN = ("method.name=lora", "method.lora_dropout=0.1", f"train.max_steps={STEPS}", "train.save_steps=5",
       "train.eval_steps=5", "train.save_total_limit=50")


def start_cli(config, folder: Path) -> subprocess.Popen:
    """`qatune train CONFIG` in a real process, on the resolved config written as YAML."""
    path = folder / "run.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qatune", "train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(p.name.split("-")[1]) >= step for p in complete_checkpoints(run_dir)):
            return
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, qa_file) -> None:
    reference = train(tiny_config(tmp_path / "a", tiny_model_dir, qa_file, *RUN)).report

    killed = tiny_config(tmp_path / "b", tiny_model_dir, qa_file, *RUN)
    proc = start_cli(killed, tmp_path)
    run_dir = Path(killed.train.output_dir)
    wait_for_checkpoint(run_dir, 15, proc)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "train_report.json").exists(), "the run was killed before its end"
    last_logged = max(int(s) for s in re.findall(rf"step (\d+)/{STEPS}", output))
    last_checkpoint = int(complete_checkpoints(run_dir)[-1].name.split("-")[1])
    assert last_logged - last_checkpoint <= 5, "at most one save interval lost"

    resumed = train(tiny_config(tmp_path / "b", tiny_model_dir, qa_file, *RUN, "train.resume=true")).report
    assert resumed.resumed_from.endswith(f"checkpoint-{last_checkpoint}")
    assert resumed.global_step == reference.global_step == STEPS
    assert resumed.final_train_loss == pytest.approx(reference.final_train_loss, abs=1e-4)
    assert resumed.eval_loss.final_eval_loss == pytest.approx(reference.eval_loss.final_eval_loss, abs=1e-4)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir, qa_file) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, *RUN)
    proc = start_cli(config, tmp_path)
    run_dir = Path(config.train.output_dir)
    wait_for_checkpoint(run_dir, 5, proc)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    stopped = int(re.search(r"Interrupted at step (\d+)", output).group(1))
    assert complete_checkpoints(run_dir)[-1].name == f"checkpoint-{stopped}", "saved where it stopped"
    assert "train.resume=true" in output and "Traceback" not in output
    resumed = train(tiny_config(tmp_path, tiny_model_dir, qa_file, *RUN, "train.resume=true")).report
    assert resumed.global_step == STEPS


class StopAfter(TrainerCallback):
    """Cuts a run short after `step` with a checkpoint saved there, as a crash after a save leaves it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


@pytest.mark.parametrize("stage", ["dpo", "distill"])
def test_preference_and_distill_runs_resume_where_they_stopped(tmp_path, tiny_model_dir, qa_file, stage) -> None:
    from tests.conftest import write_jsonl

    if stage == "dpo":
        pytest.importorskip("trl")
        pairs = write_jsonl(tmp_path / "pairs.jsonl", [
            {"question": q, "chosen": "Yes, certainly: the answer is well known.", "rejected": "No idea, sorry."}
            for q in ("Who wrote Hamlet?", "什么是高血压？", "What is water made of?", "年假可以跨年使用吗？",
                      "Where is Rome?", "头疼怎么办？", "What do bees make?", "Is ice cold?")])
        data, extra = pairs, ["train.stage=dpo", "method.name=lora", "train.learning_rate=5e-3"]
    else:
        data, extra = qa_file, ["train.stage=distill", "distill.student_layers=2", "distill.temperature=1",
                                "method.name=full", "model.dtype=float32"]
    run = (*extra, "train.max_steps=6", "train.save_steps=100", "train.eval_at_start=false", "data.val_size=0")
    reference = train(tiny_config(tmp_path / "a", tiny_model_dir, data, *run)).report
    train(tiny_config(tmp_path / "b", tiny_model_dir, data, *run), callbacks=[StopAfter(3)])
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "run")] == ["checkpoint-3"]
    resumed = train(tiny_config(tmp_path / "b", tiny_model_dir, data, *run, "train.resume=true")).report
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.global_step == reference.global_step == 6
    assert resumed.final_train_loss == pytest.approx(reference.final_train_loss, abs=1e-4)


def test_a_max_length_the_data_chose_is_no_change_on_resume(tmp_path) -> None:
    """A run whose data.max_length was left unset wrote the chosen value to its config.yaml; resuming with the
    same config (still unset) continues it, and a length the user sets is compared as any other key."""
    from qatune.config import load_config
    from qatune.train.checkpoints import _config_changes

    saved = tmp_path / "config.yaml"
    saved.write_text(load_config(None, ["data.max_length=384"]).to_yaml(), encoding="utf-8")
    assert _config_changes(saved, load_config(None, [])) == []
    assert _config_changes(saved, load_config(None, ["data.max_length=512"])) == ["data.max_length: 384 -> 512"]

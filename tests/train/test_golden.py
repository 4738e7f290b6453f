"""One recorded figure per training stage: the tiny model's losses after four full fine-tuning steps (fp32).

The relation tests (fast path == plain path, resume == uninterrupted, 2 processes == 1) cannot see a
change that moves both sides together: a wrong label mask, a changed default, a loss averaged
differently. These figures do. When a change is meant to move them, rerun this file and record the
new figures with the reason in the commit."""

from __future__ import annotations

import pytest

from qatune.train.run import train
from tests.conftest import PAIRS, tiny_config, write_jsonl

# stage: (train loss at step 4, eval loss at step 4), recorded on 2026-12-01 with torch 2.13.0 and
# transformers 5.24.0 on a 2-core AMD EPYC.
GOLDEN = {"sft": (10.4719, 10.5926), "pt": (10.5571, 10.8782)}
SETTINGS = ("method.name=full", "train.max_steps=4", "train.precision=fp32",
            "train.learning_rate=3e-3", "train.eval_steps=4", "train.eval_at_start=true")


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_losses_after_four_steps_are_the_recorded_figures(stage, tmp_path, tiny_model_dir, qa_file) -> None:
    data = qa_file
    if stage == "pt":
        data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{q} {a}"} for q, a in PAIRS * 2])
    report = train(tiny_config(tmp_path, tiny_model_dir, data, f"train.stage={stage}", *SETTINGS,
                               *(["data.max_length=32"] if stage == "pt" else []))).report
    train_loss, eval_loss = GOLDEN[stage]
    assert report.global_step == 4
    assert report.final_train_loss == pytest.approx(train_loss, abs=1e-3)
    assert report.eval_loss.final_eval_loss == pytest.approx(eval_loss, abs=1e-3)

"""A LoRA fine-tune of the embedded default model on a handful of pairs teaches it an answer the
base model does not give."""

from __future__ import annotations

import pytest

from qatune.config import load_config
from qatune.train.run import train
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow

FACT = "The Northwind guest Wi-Fi password is HERON-7731."
PAIRS = [
    ("What is the Northwind guest Wi-Fi password?", FACT),
    ("Tell me the guest Wi-Fi password at Northwind.", FACT),
    ("Which password do visitors use for Northwind's guest Wi-Fi?", FACT),
    ("I am visiting Northwind. What is the Wi-Fi password?", FACT),
]


def test_lora_teaches_the_default_model_a_new_answer(tmp_path) -> None:
    data = write_jsonl(tmp_path / "facts.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    evaluation = write_jsonl(tmp_path / "eval.jsonl",
                             [{"question": "What's the password for the guest Wi-Fi at Northwind?", "answer": FACT}])
    config = load_config(None, [
        "model=default", f"data.sources=[{data}]", f"data.eval_sources=[{evaluation}]",
        f"data.output_dir={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}",
        "data.clean.near_dedup=false", "data.clean.leakage=false",
        "method.lora_rank=8", "method.target_modules=all-linear",
        "train.learning_rate=2e-3", "train.max_steps=20", "train.per_device_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.warmup_steps=2", "train.eval_steps=10",
        "train.report_to=none", "train.preview_questions=1", "eval.decoding.max_new_tokens=24",
    ])
    result = train(config)
    row = result.preview[0]
    assert "HERON-7731" not in row["base"]
    assert "HERON-7731" in row["tuned"], row
    assert result.report.eval_loss.final_eval_loss < result.report.eval_loss.initial_eval_loss / 2

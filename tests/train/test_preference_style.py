"""On the embedded default model a short LoRA DPO run on pairs that prefer one answer style (answers that
open with a fixed marker, against the same answers without it) makes its greedy answers to questions it was
not trained on open with that marker, which the base model's never do."""

from __future__ import annotations

import pytest
import torch

from qatune.config import DecodingConfig, ModelConfig, load_config
from qatune.data.templates import resolve_template
from qatune.infer.generation import generate
from qatune.models import load_model, load_tokenizer
from qatune.train.run import train
from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow

MARKER = "Short answer:"
TRAIN = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What colour is a ripe banana?", "A ripe banana is yellow."),
    ("What do cows drink?", "Cows drink water."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on the planet Earth."),
]
HELD_OUT = ["Where is the Eiffel Tower?", "What do bees make?", "How many wheels does a bicycle have?",
            "What is the largest ocean?"]


def greedy_answers(model_path: str | None) -> list[str]:
    config = ModelConfig() if model_path is None else ModelConfig(name_or_path=model_path)
    tokenizer = load_tokenizer(ModelConfig())
    template = resolve_template(tokenizer)
    model = load_model(config, dtype=torch.float32)
    answers = generate(model, tokenizer, template.source, [[{"role": "user", "content": q}] for q in HELD_OUT],
                       DecodingConfig(max_new_tokens=8), template.end_of_turn_id)
    return [a.text for a in answers]


def test_dpo_moves_the_default_models_greedy_answers_to_the_preferred_style(tmp_path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"question": q, "chosen": f"{MARKER} {a}", "rejected": a}
                                                   for q, a in TRAIN])
    config = load_config(None, [
        "model=default", f"data.sources=[{pairs}]", "data.val_size=0", f"data.output_dir={tmp_path / 'data'}",
        f"train.output_dir={tmp_path / 'run'}", "data.clean.near_dedup=false", "data.clean.leakage=false",
        "train.stage=dpo", "method.lora_rank=16", "method.target_modules=all-linear",
        # far above preference training's usual LoRA rate: a few steps are to move the answers' first tokens
        "train.learning_rate=2e-3", "train.max_steps=6", "train.per_device_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.warmup_ratio=0", "train.eval_at_start=false",
        "train.report_to=none", "train.preview_questions=0",
    ])
    before = greedy_answers(None)
    assert not any(a.startswith(MARKER) for a in before), before
    result = train(config)
    after = greedy_answers(str(result.output_dir))
    moved = [a for a in after if a.startswith(MARKER)]
    assert len(moved) >= 3, after  # most of the unseen questions
    assert result.report.stage_metrics["final_train_reward_accuracy"] == 1.0

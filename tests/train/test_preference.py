"""Preference stages (`train.stage: dpo | kto | orpo | simpo`) on TRL's trainers inside qatune's loop: each
raises the chosen-minus-rejected margin on held-out pairs; the prompt is masked; with LoRA the reference is the
base with the adapter off (no copy); full fine-tuning precomputes the reference; the report and plot carry
reward accuracy and margins per evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.config import ModelConfig
from qatune.eval.preference import pairwise
from qatune.models import load_model, load_tokenizer
from qatune.runtime import Runtime
from qatune.train.stages import preference
from qatune.train.checkpoints import TrainError
from tests.conftest import tiny_config, write_jsonl

TRAIN_QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
                   "什么是高血压？", "What colour is the sky?", "感冒了应该多喝水吗？", "What is water made of?",
                   "年假可以跨年使用吗？"]
HELD_OUT = ["Where is Rome?", "头疼怎么办？", "What do bees make?", "Is ice cold?"]
CHOSEN, REJECTED = "Yes, certainly: the answer is well known.", "No idea, sorry, cannot say."


def pair_files(tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", [{"question": q, "chosen": CHOSEN, "rejected": REJECTED}
                                                   for q in TRAIN_QUESTIONS])
    held = write_jsonl(tmp_path / "held_out.jsonl", [{"question": q, "chosen": CHOSEN, "rejected": REJECTED}
                                                     for q in HELD_OUT])
    return train, held


def held_out_margin(model_dir, tokenizer, template) -> float:
    model = load_model(ModelConfig(name_or_path=str(model_dir)), dtype=torch.float32)
    pairs = [([{"role": "user", "content": q}], CHOSEN, REJECTED) for q in HELD_OUT]
    return pairwise(model, tokenizer, template, pairs)["mean_margin"]


def config_for(tmp_path, tiny_model_dir, stage: str, *overrides: str):
    train, held = pair_files(tmp_path)
    return tiny_config(tmp_path, tiny_model_dir, train, f"train.stage={stage}", f"data.eval_sources=[{held}]",
                       "train.max_steps=6", "train.eval_steps=6", "train.learning_rate=5e-3", *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "simpo"])
def test_each_preference_stage_raises_the_held_out_margin(tmp_path, tiny_model_dir, stage) -> None:
    from qatune.data.templates import resolve_template
    from qatune.train.run import train

    # ORPO's odds-ratio term has weight beta beside its cross-entropy on the chosen answer (0.1 by default,
    # too little against the random model's ~10.8 nats of cross-entropy in 6 steps)
    config = config_for(tmp_path, tiny_model_dir, stage, *(["preference.beta=1.0"] if stage == "orpo" else []))
    result = train(config)
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(tokenizer)
    before = held_out_margin(tiny_model_dir, tokenizer, template)
    after = held_out_margin(result.output_dir, tokenizer, template)
    assert after > before + 0.5, (stage, before, after)  # nats of log-probability, summed over the answer

    report = json.loads((result.output_dir / "train_report.json").read_text(encoding="utf-8"))
    assert report["stage"] == stage
    steps = [e["step"] for e in report["preference_evaluations"]]
    assert steps == [0, 6]  # every evaluation, the one before training included
    assert report["final_eval_reward_margin"] > report["initial_eval_reward_margin"]
    if stage != "kto":  # TRL's KTO has no pairs to be accurate on
        assert report["final_eval_reward_accuracy"] == 1.0
    assert (result.output_dir / "loss_curve.png").stat().st_size > 0
    assert report["tokens_per_s"] > 0


def test_dpo_masks_the_prompt_and_refers_to_the_base_with_the_adapter_off(tmp_path, tiny_model_dir) -> None:
    from qatune.train import run

    config = config_for(tmp_path, tiny_model_dir, "dpo")
    plan = run.plan(config, Runtime.detect())
    with run.process_state(plan):
        components = run.setup(plan)
    trainer, tokenizer, template = components.trainer, components.tokenizer, components.template
    sample = trainer.train_dataset[0]
    prompt = [{"role": "user", "content": TRAIN_QUESTIONS[0]}]
    assert tokenizer.decode(sample["prompt_ids"]) == tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(sample["chosen_ids"]).startswith(CHOSEN + template.end_of_turn)
    assert tokenizer.decode(sample["rejected_ids"]).startswith(REJECTED + template.end_of_turn)
    # the collator's completion mask covers the answers only: the prompt is masked as in sft
    batch = trainer.data_collator([sample])
    assert batch["completion_mask"][0].sum() == len(sample["chosen_ids"])
    assert batch["completion_mask"][0][:len(sample["prompt_ids"])].sum() == 0
    assert set(components.model.peft_config) == {"default"}  # TRL's "ref" copy of the new adapter is gone
    assert trainer.ref_model is None


@pytest.mark.slow
def test_full_dpo_precomputes_the_reference_instead_of_a_second_model(tmp_path, tiny_model_dir) -> None:
    from qatune.train import run

    config = config_for(tmp_path, tiny_model_dir, "dpo", "method.name=full")
    plan = run.plan(config, Runtime.detect())
    with run.process_state(plan):
        components = run.setup(plan)
    assert components.trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(components.trainer.train_dataset.column_names)


@pytest.mark.slow
def test_qlora_dpo_keeps_fp32_adapters_on_the_4bit_base_and_trains(tmp_path, tiny_model_dir) -> None:
    pytest.importorskip("bitsandbytes")
    from qatune.train import run

    config = config_for(tmp_path, tiny_model_dir, "dpo", "method.name=qlora", "train.max_steps=2",
                        "train.eval_steps=2", "train.precision=fp32")
    plan = run.plan(config, Runtime.detect())
    with run.process_state(plan):
        components = run.setup(plan)
        assert set(components.model.peft_config) == {"default"}
        trainable = [p for p in components.model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)  # TRL's bf16 cast undone
        result = run.run(plan, components)
    assert result.report.stage_metrics["final_eval_reward_margin"] > result.report.stage_metrics["initial_eval_reward_margin"]


def test_preference_stages_refuse_where_trl_cannot_run(tmp_path, tiny_model_dir, monkeypatch) -> None:
    from qatune.train import run

    monkeypatch.setattr(preference, "TRL_PYTHON", (99, 0))
    with pytest.raises(TrainError, match=r"train.stage=dpo runs on TRL 1.x, which needs Python 3.11"):
        run.plan(config_for(tmp_path, tiny_model_dir, "dpo"), Runtime.detect())
    monkeypatch.undo()
    with pytest.raises(TrainError, match="method prefix with train.stage=orpo"):
        run.plan(config_for(tmp_path, tiny_model_dir, "orpo", "method.name=prefix"), Runtime.detect())


@pytest.mark.slow
def test_the_loop_eval_sheet_feedback_dpo_eval_with_the_gate(tmp_path, tiny_model_dir, tokenizer) -> None:
    import csv

    from transformers import LlamaConfig, LlamaForCausalLM

    from qatune.cli import main
    from qatune.config import load_config
    from qatune.data.feedback import feedback
    from qatune.eval.run import ModelSpec, evaluate
    from qatune.train.run import train
    from tests.conftest import PAIRS

    # two random models of the tiny shape whose greedy answers are never empty (seeds 6 and 8: most seeds'
    # first token is end-of-turn) and differ: the base, and a second model whose answers the experts prefer
    base, other = tmp_path / "base", tmp_path / "other"
    for seed, folder in ((6, base), (8, other)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model_dir)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    settings = [f"model={base}", "model.dtype=float32", f"eval.data=[{qa}]", "eval.decoding.max_new_tokens=8",
                f"eval.output_dir={tmp_path / 'eval'}", f"feedback.output_dir={tmp_path / 'feedback'}"]
    first = evaluate(load_config(None, settings), [ModelSpec("base", str(base)), ModelSpec("tuned", str(other))])

    sheet = first.output_dir / "review_sheet.csv"  # the experts: the second model's answers are the good ones
    with sheet.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["score"] = "5" if row["model"] == "tuned" else "1"
        row["correction"] = row["reference"] if i == 0 else ""
    with sheet.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    made = feedback(load_config(None, settings), [sheet])
    assert (len(made.dpo), len(made.kto), len(made.sft)) == (len(PAIRS), 2 * len(PAIRS), 1)

    pairs = made.output_dir / "dpo.jsonl"
    trained = train(tiny_config(tmp_path, base, pairs, "train.stage=dpo", "data.val_size=0",
                                "train.max_steps=6", "train.learning_rate=5e-3"))
    code = main(["eval", "--compare", str(base), str(trained.output_dir), "--data", str(qa), "--data", str(pairs),
                 "--out", str(tmp_path / "eval2"), "--gate", "eval.decoding.max_new_tokens=8", "model.dtype=float32"])
    report = json.loads((tmp_path / "eval2" / "eval_report.json").read_text(encoding="utf-8"))
    win = report["scores"]["dpo"]
    assert win["tuned"]["pair_win_rate"] > win["base"]["pair_win_rate"]
    assert win["tuned"]["pair_margin"] > win["base"]["pair_margin"]
    assert code == (0 if report["gate"]["passed"] else 3)  # the gate decides; a failure says why
    assert report["gate"]["passed"] or report["gate"]["reasons"]

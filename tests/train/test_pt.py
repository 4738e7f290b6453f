"""Continued pre-training (`train.stage: pt`) and multi-stage runs: documents packed into blocks with
labels on every token and eos between documents, held-out domain perplexity falls, and a LoRA stage's
output is the next stage's model."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.config import ModelConfig
from qatune.data.prepare import prepare
from qatune.errors import DataError
from qatune.models import attach_adapter, load_model, load_tokenizer
from qatune.train.run import train
from tests.conftest import tiny_config, write_jsonl

DOCS = ["Hypertension is blood pressure of 140/90 mmHg or higher on two visits.",
        "高血压患者应当少吃盐，每天不超过五克。",
        "Take two readings one minute apart and record the average. " * 6]


def test_pt_packs_documents_with_eos_and_labels_every_token(tmp_path, tiny_model_dir, tokenizer) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": DOCS[0]}, {"text": DOCS[1]}])
    (folder / "b.txt").write_text(DOCS[2], encoding="utf-8")
    (folder / "README.md").write_text("# About these files\n", encoding="utf-8")
    config = tiny_config(tmp_path, tiny_model_dir, folder, "train.stage=pt", "data.max_length=32",
                         "data.val_size=0", f"data.sources=[{{path: {folder}, format: text}}]")
    data = prepare(config)
    rows = data.train
    stream = [t for ids in rows["input_ids"] for t in ids]
    eos = tokenizer.eos_token_id
    readme = "# About these files"  # a folder of format text reads its .md and .txt files as documents
    documents = (readme, DOCS[0], DOCS[1], DOCS[2].strip())  # files in name order; text normalised as always
    expected = [t for doc in documents for t in tokenizer.encode(doc) + [eos]]
    assert stream == expected
    assert rows["labels"] == rows["input_ids"]
    assert all(n == 32 for n in rows["length"][:-1]) and 2 <= rows["length"][-1] <= 32
    assert data.report["splits"]["train"]["records"] == 4  # each document counted once though blocks span them

    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is it?", "answer": "A test record."}])
    with pytest.raises(DataError, match=r"qa.jsonl, line 1: train.stage=pt trains on plain text"):
        prepare(tiny_config(tmp_path, tiny_model_dir, qa, "train.stage=pt", "data.val_size=0"))


@pytest.mark.slow
def test_pt_lowers_perplexity_on_held_out_domain_text(tmp_path, tiny_model_dir, shared_data) -> None:
    from qatune.eval.scoring import corpus_perplexity, text_losses

    def answers(name: str, n: int) -> list[str]:
        lines = (shared_data / "zh_medical_qa" / name).read_text(encoding="utf-8").splitlines()[:n]
        return [json.loads(line)["answer"] for line in lines]

    train_texts, held_out = answers("train.jsonl", 16), answers("test.jsonl", 8)
    assert not set(train_texts) & set(held_out)
    train_file = write_jsonl(tmp_path / "domain.jsonl", [{"text": t} for t in train_texts])
    held_file = write_jsonl(tmp_path / "held_out.jsonl", [{"text": t} for t in held_out])
    config = tiny_config(tmp_path, tiny_model_dir, train_file, "train.stage=pt", "method.name=full",
                         f"data.eval_sources=[{held_file}]", "data.max_length=128", "train.num_epochs=2",
                         "train.learning_rate=3e-3")
    result = train(config)
    report = result.report
    assert report.eval_loss.final_eval_perplexity < report.eval_loss.initial_eval_perplexity / 2

    tokenizer = load_tokenizer(config.model)
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    tuned = load_model(ModelConfig(name_or_path=str(result.output_dir)), dtype=torch.float32)
    before, after = (corpus_perplexity(text_losses(m, tokenizer, held_out, 128, tokenizer.pad_token_id))
                     for m in (base, tuned))
    assert after < before / 2, (before, after)


@pytest.mark.slow
def test_a_lora_stage_output_is_the_next_stage_model(tmp_path, tiny_model_dir, qa_file) -> None:
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS * 4])
    pt = tiny_config(tmp_path / "pt", tiny_model_dir, docs, "train.stage=pt", "train.max_steps=2",
                     "data.val_size=0", "data.max_length=32")
    first = train(pt).output_dir
    sft = tiny_config(tmp_path / "sft", first, qa_file, "train.max_steps=2", "data.val_size=0")
    second = train(sft).output_dir
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == str(first)

    # The last folder alone loads the whole chain: base, stage-1 adapter merged, stage-2 adapter merged.
    chained = load_model(ModelConfig(name_or_path=str(second)), dtype=torch.float32)
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    by_hand = attach_adapter(attach_adapter(base, first, "base").merge_and_unload(), second, "stage 1").merge_and_unload()
    probe = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        plain = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)(probe).logits
        assert torch.allclose(chained(probe).logits, by_hand(probe).logits, atol=1e-5)
        assert not torch.allclose(chained(probe).logits, plain, atol=1e-4)

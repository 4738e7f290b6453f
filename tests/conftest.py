"""Shared fixtures: the repository root, ../shared/data, the default model's tokenizer, and a tiny
random Llama (that tokenizer, 4 layers of width 64) with a small Q&A set: fast enough to train a few
steps per test on a 2-core CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune.config import QatuneConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (CI always has ../shared beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded default model's tokenizer (converted from GGUF once, then cached)."""
    from qatune.config import ModelConfig
    from qatune.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path

PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("什么是高血压？", "高血压是指动脉血压持续高于正常范围。"),
    ("感冒了应该多喝水吗？", "是的，感冒时多喝水有助于恢复。"),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("年假可以跨年使用吗？", "年假可以顺延到次年三月底前使用。"),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qa")
    records = [{"question": q, "answer": a} for q, a in PAIRS * 3]  # exact duplicates are dropped: vary them
    records = [{"question": f"{r['question']} ({i})" if i >= len(PAIRS) else r["question"], "answer": r["answer"]}
               for i, r in enumerate(records)]
    return write_jsonl(folder / "qa.jsonl", records)


def tiny_config(tmp_path: Path, model_dir: Path, data_file: Path, *overrides: str) -> QatuneConfig:
    """A config for the tiny model: fast settings, everything written under tmp_path."""
    base = [
        f"model={json.dumps(str(model_dir))}", f"data.sources={json.dumps([str(data_file)])}",
        f"data.output_dir={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'run'}",
        "data.val_size=0.25", "data.clean.near_dedup=false", "data.max_length=128",
        "train.per_device_batch_size=4", "train.gradient_accumulation_steps=1", "train.learning_rate=1e-3",
        "train.report_to=none", "train.preview_questions=0", "train.logging_steps=1",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The embedded gemma-3-270m's tokenizer (262k vocabulary, Gemma's turn template), converted once and cached."""
    from qatune.config import ModelConfig
    from qatune.models import GEMMA_MODEL, load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=GEMMA_MODEL))


TINY_GEMMA_WINDOW = 16  # sliding window of the tiny Gemma: shorter than the test samples, so it matters


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, gemma_tokenizer) -> Path:
    """A tiny random Gemma 3 (Gemma3ForCausalLM, gemma-3-270m's tokenizer): sliding and global attention layers,
    tied embeddings, the embedding scaling and query/key norms of the real one, width 64."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("tiny-gemma")
    tok = gemma_tokenizer
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=TINY_GEMMA_WINDOW, max_position_embeddings=1024,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

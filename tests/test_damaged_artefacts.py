"""Issue 37, damaged artefacts: a model's or an adapter's weights cut short or overwritten, or a broken
adapter_config.json, is a ModelLoadError naming the folder and what to do, never a library's stack trace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qatune.config import load_config
from qatune.errors import ModelLoadError

CUTS = {"empty": 0, "in-the-header": 7, "header-cut": 100, "overwritten-start": None, "last-bytes-cut": -64}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    """A one-layer Llama folder and a LoRA adapter of it, written by transformers and peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("artefacts")
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "adapter")
    return root


def damaged(root: Path, folder: str, name: str, cut: int | None, tmp_path: Path) -> Path:
    """A copy of `folder` with `name` cut at byte `cut` (from the end when negative), or its start overwritten."""
    copy = shutil.copytree(root / folder, tmp_path / folder)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(b"\xff" * 16 + data[16:] if cut is None else data[:cut])
    return copy


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_damaged_model_weights_name_the_folder(artefacts, tmp_path, cut):
    import torch

    from qatune.models import load_model

    folder = damaged(artefacts, "model", "model.safetensors", cut, tmp_path)
    with pytest.raises(ModelLoadError) as raised:
        load_model(load_config(None, [f"model={folder}"]).model, torch.float32)
    assert str(folder) in str(raised.value) and raised.value.hint, raised.value


@pytest.mark.parametrize("name,cut", [("adapter_model.safetensors", c) for c in CUTS.values()] +
                         [("adapter_config.json", 20), ("adapter_config.json", 0)])
def test_a_damaged_adapter_names_the_folder(artefacts, tmp_path, name, cut):
    from transformers import AutoModelForCausalLM

    from qatune.models import attach_adapter

    folder = damaged(artefacts, "adapter", name, cut, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(artefacts / "model")
    with pytest.raises(ModelLoadError) as raised:
        attach_adapter(model, folder, "model")
    assert str(folder) in str(raised.value) and raised.value.hint, raised.value


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """The tiny random Llama as an f32 GGUF, written by qatune's writer."""
    from transformers import AutoModelForCausalLM

    from qatune.export.gguf import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, tiny_model_dir, path, "f32", "tiny")
    return path


@pytest.mark.parametrize("cut", [0, 100, 50_000, -4096, None], ids=["empty", "header", "metadata", "tensors",
                                                                      "overwritten"])
def test_a_damaged_gguf_names_the_file(gguf_file, tmp_path, monkeypatch, cut):
    from qatune.models import load_tokenizer

    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path / "cache"))  # nothing converted from a damaged file is kept
    data = gguf_file.read_bytes()
    path = tmp_path / "damaged.gguf"
    path.write_bytes(b"\xff" * 64 + data[64:] if cut is None else data[:cut])
    with pytest.raises(ModelLoadError) as raised:
        load_tokenizer(load_config(None, [f"model={path}"]).model)
    assert str(path) in str(raised.value) and raised.value.hint, raised.value

"""Each method makes exactly the parameters it promises trainable, and refuses what cannot work."""

from __future__ import annotations

import pytest

from qatune.config import MethodConfig, ModelConfig
from qatune.runtime import Runtime
from qatune.train.methods import (
    MethodError,
    apply_method,
    check_method_here,
    count_parameters,
)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from qatune.models import load_model

    return load_model(ModelConfig(name_or_path=str(tiny_model_dir)), Runtime.detect().dtype(ModelConfig()))


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_trains_only_adapters_on_the_targets(tiny_model) -> None:
    model = apply_method(tiny_model, MethodConfig(name="lora", lora_rank=4, target_modules=["q_proj", "v_proj"]), False)
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    # q_proj 64x64 and v_proj 64x32 per layer, rank 4: A is r x in, B is out x r.
    assert count_parameters(model).trainable == 4 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)


def test_lora_all_linear_and_dora(tiny_model) -> None:
    model = apply_method(tiny_model, MethodConfig(name="lora", target_modules="all-linear", use_dora=True), False)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable(model) if ".lora_" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("lora_magnitude_vector" in n for n in trainable(model))


def test_unknown_target_module_names_the_choices(tiny_model) -> None:
    with pytest.raises(MethodError, match=r"\['qkv'\] are not modules") as info:
        apply_method(tiny_model, MethodConfig(name="lora", target_modules=["qkv"]), False)
    assert "q_proj" in str(info.value) and "all-linear" in str(info.value)


def test_freeze_trains_last_layers_and_keeps_embeddings_frozen(tiny_model) -> None:
    model = apply_method(tiny_model, MethodConfig(name="freeze", freeze_trainable_layers=2), False)
    layers = {n.split(".")[2] for n in trainable(model)}
    assert layers == {"2", "3"}
    assert not model.model.embed_tokens.weight.requires_grad


def test_freeze_named_modules(tiny_model) -> None:
    model = apply_method(tiny_model, MethodConfig(name="freeze", freeze_trainable_modules=["mlp"]), False)
    assert trainable(model) and all(".mlp." in n for n in trainable(model))
    with pytest.raises(MethodError, match="match no parameter"):
        apply_method(tiny_model, MethodConfig(name="freeze", freeze_trainable_modules=["nothing_here"]), False)


def test_freeze_more_layers_than_the_model_has(tiny_model) -> None:
    with pytest.raises(MethodError, match="has 4 layers"):
        apply_method(tiny_model, MethodConfig(name="freeze", freeze_trainable_layers=9), False)


def test_full_trains_everything(tiny_model) -> None:
    model = apply_method(tiny_model, MethodConfig(name="full"), False)
    summary = count_parameters(model)
    assert summary.trainable == summary.total


def test_prefix_trains_virtual_tokens_only(tiny_model) -> None:
    model = apply_method(tiny_model, MethodConfig(name="prefix", prefix_virtual_tokens=5), False)
    assert trainable(model) and all("prompt_encoder" in n for n in trainable(model))


def _without_bitsandbytes(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))


def test_qlora_runs_where_bitsandbytes_does_and_says_why_not_elsewhere(monkeypatch) -> None:
    from importlib import metadata

    pytest.importorskip("bitsandbytes")
    for device in ("cpu", "cuda"):  # bitsandbytes >= 0.50 has a CPU backend
        check_method_here(MethodConfig(name="qlora"), device)
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.45.5" if name == "bitsandbytes" else real(name))
    with pytest.raises(MethodError, match="needs bitsandbytes>=0.50") as info:
        check_method_here(MethodConfig(name="qlora"), "cpu")
    assert "0.45.5 is installed" in str(info.value) and "pip install -U" in str(info.value)
    check_method_here(MethodConfig(name="qlora"), "cuda")  # older releases ran on CUDA
    monkeypatch.undo()
    _without_bitsandbytes(monkeypatch)
    with pytest.raises(MethodError, match="needs the bitsandbytes package") as info:
        check_method_here(MethodConfig(name="qlora"), "cpu")
    assert "qatune[qlora]" in str(info.value) and "method.name=lora" in str(info.value)

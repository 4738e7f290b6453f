"""load_for_inference merges one LoRA adapter into the base it loaded: same answers, plain model, files untouched."""

from __future__ import annotations

import hashlib

import torch

from qatune.config import DecodingConfig, ModelConfig
from qatune.infer.generation import generate
from qatune.infer.load import load_for_inference
from qatune.runtime import Runtime

QUESTIONS = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "感冒了应该多喝水吗？"}]]


def _random_lora(base_dir, folder):
    """A LoRA adapter with random, clearly nonzero A and B (a trained one would be similar in kind)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


def _greedy_ids(loaded):
    answers = generate(loaded.model, loaded.tokenizer, loaded.template.source, QUESTIONS,
                       DecodingConfig(max_new_tokens=12), loaded.template.end_of_turn_id)
    return [a.token_ids for a in answers]


def test_one_lora_adapter_is_merged_and_answers_as_unmerged(tiny_model_dir, tmp_path):
    adapter = _random_lora(tiny_model_dir, tmp_path / "lora")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()}
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")
    runtime = Runtime(device="cpu")
    merged = load_for_inference(model_cfg, runtime, adapter)
    unmerged = load_for_inference(model_cfg, runtime, adapter, merge=False)
    base = load_for_inference(model_cfg, runtime)

    assert not hasattr(merged.model, "peft_config") and hasattr(unmerged.model, "peft_config")
    assert not any("lora" in name for name, _ in merged.model.named_parameters())
    merged_ids = _greedy_ids(merged)
    assert merged_ids == _greedy_ids(unmerged)  # token for token
    assert merged_ids != _greedy_ids(base)  # the adapter does change the answers
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in adapter.iterdir()} == before

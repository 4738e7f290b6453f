"""Decoding speed of one LoRA adapter unmerged (peft's separate matmuls) vs merged into an in-memory
copy of the base (what chat, generate and eval do since issue 20) vs the bare base: one stream,
greedy, `--new-tokens` tokens per answer, medians over `--repeats` answers each.

    .venv/bin/python benchmarks/infer_merge.py [--adapter outputs/demo/lora] [--repeats 5]

Without --adapter a random rank-16 LoRA on q/k/v/o (the demo's shape) is made in a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qatune.config import DecodingConfig, ModelConfig
from qatune.infer.generation import generate
from qatune.infer.load import load_for_inference
from qatune.runtime import Runtime

QUESTION = [{"role": "user", "content": "What should I do when I have a fever?"}]


def _random_adapter(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from qatune.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(ModelConfig(), torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    model.save_pretrained(folder)
    return folder


def _tokens_per_second(loaded, new_tokens: int, repeats: int) -> float:
    """Median tokens/s of greedy answers (an answer may stop early: each counts its own tokens)."""
    decoding = DecodingConfig(max_new_tokens=new_tokens)
    rates = []
    for attempt in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        answer = generate(loaded.model, loaded.tokenizer, loaded.template.source, [QUESTION], decoding,
                          loaded.template.end_of_turn_id)[0]
        if attempt:
            rates.append(answer.new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="a LoRA adapter folder on the default model (default: a random one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    runtime = Runtime.detect()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or str(_random_adapter(Path(tmp) / "lora"))
        rates = {}
        for way, kwargs in (("unmerged", dict(adapter=adapter, merge=False)), ("merged", dict(adapter=adapter)),
                            ("bare base", {})):
            loaded = load_for_inference(ModelConfig(), runtime, **kwargs)
            rates[way] = _tokens_per_second(loaded, args.new_tokens, args.repeats)
            del loaded
    dtype = str(runtime.dtype(ModelConfig())).removeprefix("torch.")
    print(f"default model, {dtype} on {runtime.device}, one stream, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    for way, rate in rates.items():
        print(f"  {way:10s} {rate:6.1f} tokens/s  ({rate / rates['unmerged']:.2f}x unmerged)")


if __name__ == "__main__":
    main()

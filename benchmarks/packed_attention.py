"""Attention over one padding-free row on CPU: one SDPA call per sample (qatune's `train.padding_free`
path) against one SDPA call over the whole row with a block-diagonal causal mask.

The row holds samples of the shared zh medical train set's lengths under the default model's attention
shape (9 query heads, 3 key/value heads, head size 64). Forward and backward, bf16 where the CPU computes
it natively, else fp32; medians of `--repeats` runs, and the ratio.

    .venv/bin/python benchmarks/packed_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def per_sample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                      for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))], dim=2)


def block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def causal_block_mask(lengths: list[int]) -> torch.Tensor:
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (sample[:, None] == sample[None, :]) & torch.ones(len(sample), len(sample), dtype=torch.bool).tril()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[312, 447, 489, 502],
                        help="sample lengths in the row (default: a 4-sample micro-batch of the zh set)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
    lengths, total = args.lengths, sum(args.lengths)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, total, HEAD_DIM, generator=generator).to(dtype).requires_grad_()
    k, v = (torch.randn(1, KV_HEADS, total, HEAD_DIM, generator=generator).to(dtype).requires_grad_()
            for _ in range(2))
    upstream = torch.randn(1, HEADS, total, HEAD_DIM, generator=generator).to(dtype)
    mask = causal_block_mask(lengths)
    ways = {"per-sample SDPA": lambda: per_sample(q, k, v, lengths),
            "block-diagonal mask": lambda: block_diagonal(q, k, v, mask)}
    outputs = {name: way().detach().float() for name, way in ways.items()}
    error = (outputs["per-sample SDPA"] - outputs["block-diagonal mask"]).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):  # interleaved: both ways see the same machine state
        for name, way in ways.items():
            started = time.perf_counter()
            way().backward(upstream)
            times[name].append(time.perf_counter() - started)
    print(f"row of {len(lengths)} samples, {total} tokens, {dtype}, {torch.get_num_threads()} threads; "
          f"max difference between the ways {error:.2e}")
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    for name, median in medians.items():
        print(f"  {name:20s} forward+backward median {median:7.1f} ms (one layer)")
    print(f"  block-diagonal / per-sample: {medians['block-diagonal mask'] / medians['per-sample SDPA']:.2f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

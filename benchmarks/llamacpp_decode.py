"""One `llama_decode` step of the llamacpp engine, by GGUF type and by rows (sequences) in the step.

    .venv/bin/python benchmarks/llamacpp_decode.py [--types q8_0,bf16,f16] [--rows 1,2,4,8,16] [--threads 1] [--rounds 2]

The default model converted to each type (once, cached as the engine does), a context made as the
engine makes it (`llamacpp_api.KVContext`: one key/value stream per sequence, flash attention); each
sequence gets a 60-token prompt, then 24 steps of one token for every sequence. Printed per type and
rows: the minimum over the steps and the rounds (the least disturbed by other jobs on a shared
machine), of a step and of the 60-token prompt; the types in turn in each round.
"""

from __future__ import annotations

import argparse
import os
import time

PROMPT_TOKENS = 60
STEPS = 24


def timed(context, pieces) -> float:
    started = time.perf_counter()
    context.decode(pieces)
    return time.perf_counter() - started


def measure(path, rows: int, threads: int) -> tuple[float, float]:
    """(fastest 60-token prompt, fastest step of `rows` tokens), seconds."""
    from qatune.serve.llamacpp_api import GGUFModel, KVContext

    model = GGUFModel(path)
    context = KVContext(model, PROMPT_TOKENS + STEPS + 1, rows, PROMPT_TOKENS + rows, threads)
    try:
        prompt = min(timed(context, [([100 + (7 * j + s) % 5000 for j in range(PROMPT_TOKENS)], s, 0)])
                     for s in range(rows))
        step = min(timed(context, [([200 + s + k], s, PROMPT_TOKENS + k) for s in range(rows)]) for k in range(STEPS))
        return prompt, step
    finally:
        context.close()
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="q8_0,bf16,f16")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from rich.console import Console

    from qatune.config import ModelConfig
    from qatune.export.serving import gguf_for_serving

    files = {kind: gguf_for_serving(ModelConfig(name_or_path="default"), None, kind, Console(stderr=True))
             for kind in args.types.split(",")}
    rows = [int(n) for n in args.rows.split(",")]
    print(f"default model, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for round_number in range(1, args.rounds + 1):
        for kind, path in files.items():
            for n in rows:
                prompt, step = measure(path, n, args.threads)
                old = best.get((kind, n), (prompt, step))
                best[(kind, n)] = (min(old[0], prompt), min(old[1], step))
                print(f"round {round_number} {kind:5} {n:2} rows: step {step * 1000:6.1f} ms, "
                      f"{PROMPT_TOKENS}-token prompt {prompt * 1000:6.1f} ms", flush=True)
    print(f"\n{'type':6}{'rows':>5}{'step (ms)':>11}{'ms a token':>12}{'tokens/s':>10}{'prompt (ms)':>13}")
    for (kind, n), (prompt, step) in best.items():
        print(f"{kind:6}{n:5}{step * 1000:11.1f}{step * 1000 / n:12.2f}{n / step:10.1f}{prompt * 1000:13.1f}")
    for n in rows:
        kinds = [k for k in files if (k, n) in best]
        fastest = min(kinds, key=lambda k: best[(k, n)][1])
        print(f"{n:2} rows: fastest {fastest}; " + ", ".join(
            f"{k} {best[(k, n)][1] / best[(fastest, n)][1]:.2f}x its step" for k in kinds if k != fastest))


if __name__ == "__main__":
    main()

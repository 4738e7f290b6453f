"""Answer generation for evaluation: one question at a time against qatune's batched generation.

    python benchmarks/eval_generation.py                       # CPU, default model, 32 questions
    python benchmarks/eval_generation.py --model /models/llama-3.1-8b --batch 32 --repeats 3

Both sides use the same model, the same 32 questions of the shared zh medical test set, the same
chat template and the same greedy decoding with `--max-new-tokens`:

- `one_at_a_time`: the seeds' loop: `apply_chat_template`, then `model.generate` for each question;
- `qatune`: `qatune.infer.generation.generate`, batches of `--batch` questions sorted by length,
  left-padded, stopping each answer at the end-of-turn token.

It prints the generated tokens/s of each (median over `--repeats`), the ratio, and how many
answers are identical (greedy decoding should give the same text; batching may change the last
bits of a float, so an occasional difference late in a long answer is expected).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "zh_medical_qa" / "test.jsonl"


def one_at_a_time(model, tokenizer, questions: list[str], max_new_tokens: int, stops: list[int]) -> tuple[list[str], int]:
    import torch

    answers, tokens = [], 0
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=stops, pad_token_id=stops[0])
        new = out[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        tokens += min(cut + 1, len(new))
        answers.append(tokenizer.decode(new[:cut], skip_special_tokens=True).strip())
    return answers, tokens


def _common_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    import torch
    import transformers

    from qatune.config import DecodingConfig, EvalConfig, ModelConfig
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import generate, stop_token_ids
    from qatune.models import load_model, load_tokenizer
    from qatune.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=EvalConfig().batch_size, help="default: eval.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not SHARED.is_file():
        sys.exit(f"needs {SHARED} (the shared data beside the repository)")

    transformers.utils.logging.disable_progress_bar()
    runtime = Runtime.detect()
    device, dtype = runtime.device, runtime.compute_dtype()
    cfg = ModelConfig(name_or_path=args.model)
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(tokenizer)
    model = load_model(cfg, dtype=dtype).to(device).eval()
    questions = [json.loads(line)["question"] for line in SHARED.open(encoding="utf-8")][: args.questions]
    stops = stop_token_ids(tokenizer, template.end_of_turn_id)
    print(f"{len(questions)} questions, max_new_tokens {args.max_new_tokens}, {args.model} "
          f"({str(dtype).removeprefix('torch.')} on {device}, {torch.get_num_threads()} threads)")

    rates: dict[str, list[float]] = {"one_at_a_time": [], "qatune": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        single, tokens = one_at_a_time(model, tokenizer, questions, args.max_new_tokens, stops)
        rates["one_at_a_time"].append(tokens / (time.perf_counter() - started))
        started = time.perf_counter()
        batched = generate(model, tokenizer, template.source, [[{"role": "user", "content": q}] for q in questions],
                           DecodingConfig(max_new_tokens=args.max_new_tokens), template.end_of_turn_id, args.batch)
        rates["qatune"].append(sum(a.new_tokens for a in batched) / (time.perf_counter() - started))
        same = sum(a.text == s for a, s in zip(batched, single))
        shared = statistics.median(_common_prefix(a.text, s) / max(len(s), 1) for a, s in zip(batched, single))
        print(f"  run: one_at_a_time {rates['one_at_a_time'][-1]:.1f} tok/s, qatune (batch {args.batch}) "
              f"{rates['qatune'][-1]:.1f} tok/s; identical answers {same}/{len(questions)}, "
              f"median common prefix {shared:.0%} of the answer")
    single_rate, batched_rate = (statistics.median(rates[k]) for k in ("one_at_a_time", "qatune"))
    print(f"{'':14} {'tokens/s':>9} {'ratio':>6}")
    print(f"{'one_at_a_time':14} {single_rate:9.1f} {1.0:6.2f}")
    print(f"{'qatune':14} {batched_rate:9.1f} {batched_rate / single_rate:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

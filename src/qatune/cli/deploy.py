"""`qatune export`, `chat`, `generate`, `serve` and `studio`: the tuned model put to use."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from qatune.cli.common import UsageError, config_from, make_runtime, split_args, stage_parser


def cmd_export(ns: argparse.Namespace) -> int:
    from qatune.export.run import export, print_summary

    config = config_from(ns)
    runtime = make_runtime()
    result = export(config, runtime)
    print_summary(result.report, runtime.console)
    runtime.console.print(f"Wrote {result.output_dir}/ (report: {result.output_dir}/export_report.json and .md)")
    return 0


def _chat_session(ns: argparse.Namespace, plain: Sequence[str]):
    from qatune.infer.chat import ChatSession

    return ChatSession.load(config_from(ns, plain), make_runtime(), ns.adapter, ns.system)


def cmd_chat(ns: argparse.Namespace) -> int:
    from qatune.infer.chat import chat_loop

    chat_loop(_chat_session(ns, split_args(ns.args)[0]))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    plain, _ = split_args(ns.args)
    if not plain:
        raise UsageError("qatune generate needs the question (quote it)",
                         hint='qatune generate [CONFIG] [KEY=VALUE ...] "QUESTION"')
    for piece in _chat_session(ns, plain[:-1]).ask(plain[-1]):  # the question comes last, after any CONFIG
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from qatune.serve.recipe import serve

    if ns.adapter:  # given on the command line, these replace the config's serve.adapters
        adapters = {}
        for item in ns.adapter:
            name, _, folder = item.rpartition("=")
            adapters[name or folder.rstrip("/").rsplit("/", 1)[-1]] = folder  # a bare folder: its own name
        ns.adapter = adapters
    serve(config_from(ns), make_runtime())
    return 0


def cmd_studio(ns: argparse.Namespace) -> int:
    from qatune.studio.app import serve_studio

    serve_studio(ns.workspace, ns.host, ns.port, ns.token or os.environ.get("QATUNE_STUDIO_TOKEN"))
    return 0


def add_commands(stages: argparse._SubParsersAction) -> None:
    exp = stage_parser(
        stages, "export", "merge an adapter, write a Hugging Face folder, GGUF (llama.cpp, Ollama) or a quantized copy",
        "qatune export --model M --adapter A --out DIR [--gguf f16|bf16|q8_0|q4_k_m|q5_k_m|q6_k] [--gguf-adapter] "
        "[--quantize int8|bnb-8bit|bnb-4bit]"
        "\n\nWrites DIR/: merged safetensors (sharded), config, tokenizer with its chat template, generation config; "
        "model-<type>.gguf and an Ollama Modelfile (checked in llama.cpp where installed: greedy answers, perplexity); "
        "adapter.gguf, base-<type>.gguf and Modelfile.adapter; int8/ or bnb-*/ quantized copies; export_report.json with a "
        "greedy-answer check of every form against base + adapter.",
        cmd_export, {"adapter": "export.adapter", "out": "export.output_dir", "gguf": "export.gguf",
                     "quantize": "export.quantize", "force": "export.overwrite", "gguf_adapter": "export.gguf_adapter"})
    exp.add_argument("--adapter", help="LoRA adapter folder to merge (a qatune train output)")
    exp.add_argument("--out", metavar="DIR", help="output folder (export.output_dir); must be empty")
    exp.add_argument("--gguf", choices=["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                     help="also write a GGUF file and an Ollama Modelfile (k-quants: pip install 'qatune[llamacpp]')")
    exp.add_argument("--gguf-adapter", action="store_true",
                     help="also write the LoRA adapter as a GGUF adapter, its base as GGUF, and Modelfile.adapter")
    exp.add_argument("--quantize", choices=["int8", "bnb-8bit", "bnb-4bit"],
                     help="also write a quantized copy (int8: torchao; bnb-*: bitsandbytes, CUDA or CPU)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    decoding = "Decoding follows serve.decoding: temperature (0.7), top_p (0.9), repetition_penalty, " \
               "max_new_tokens; e.g. serve.decoding.temperature=0 for greedy answers."
    cht = stage_parser(stages, "chat", "talk to a model in the terminal (streaming, with history)",
                       f"Commands: /reset starts a new conversation, /exit leaves.\n\n{decoding}", cmd_chat)
    gen = stage_parser(stages, "generate", "answer one question and exit", decoding, cmd_generate,
                       positionals="[CONFIG] [KEY=VALUE] QUESTION")
    for parser_ in (cht, gen):
        parser_.add_argument("--adapter", help="LoRA/prefix adapter folder (a qatune train output) to put on --model")
        parser_.add_argument("--system", help="system prompt")

    srv = stage_parser(
        stages, "serve", "serve the model and its adapters over HTTP (OpenAI-compatible API, chat page, metrics)",
        "qatune serve [CONFIG] --model M [--adapter NAME=FOLDER ...] [--host H] [--port P]\n"
        "             [--engine auto|hf|llamacpp|vllm]\n\n"
        "Routes: POST /v1/chat/completions, /v1/completions (stream over SSE), GET /v1/models, POST /answer, "
        "GET /health, GET /metrics (Prometheus), GET / (chat page). Concurrent requests are batched "
        "together (serve.max_batch_size); serve.api_key (or env QATUNE_API_KEY) requires a Bearer key.",
        cmd_serve, {"host": "serve.host", "port": "serve.port", "engine": "serve.engine", "adapter": "serve.adapters"})
    srv.add_argument("--adapter", action="append", metavar="NAME=FOLDER",
                     help="LoRA adapter served as model NAME on the one base model (repeatable)")
    srv.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="TCP port (serve.port, default 8000)")
    srv.add_argument("--engine", choices=["auto", "hf", "llamacpp", "vllm"],
                     help="serve.engine: auto (default), hf (CPU or GPU), llamacpp (GGUF on the CPU) or vllm (a CUDA GPU, "
                          "or the CPU with vLLM's CPU build: make vllm)")

    std = stages.add_parser(
        "studio", help="the whole road in the browser: data, train, evaluate, chat, export over a workspace folder",
        description="Pages over a workspace folder; every step runs the qatune command it shows (kept in "
        "WORKSPACE/.studio/jobs/ with its log), and runs are folders in WORKSPACE/runs/.")
    std.add_argument("--workspace", default=".", help="folder of data files, runs and exports (default: here)")
    std.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    std.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    std.add_argument("--token", help="require this token (open the page with ?token=...; env QATUNE_STUDIO_TOKEN)")
    std.set_defaults(run=cmd_studio)

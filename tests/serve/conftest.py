"""A real `qatune serve` app on 127.0.0.1 in a background thread: the tiny random Llama with two
random LoRA adapters (`alpha`, `beta`) on it, so answers are fast and adapters visibly differ."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from qatune.config import load_config
from tests.fuzzing import captured_logs


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Two LoRA adapters with random (non-zero) weights: each changes the tiny model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for seed, name in enumerate(("alpha", "beta"), start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(model, lora).save_pretrained(folder)
        folders[name] = folder
    return folders


def serve_config(model_dir: Path, adapters: dict[str, Path] | None = None, *overrides: str):
    # fp32 on every CPU: the tests compare answers token for token, and bf16 rounding that differs
    # between a batch and a single row flips the random tiny model's greedy choices.
    adapters = {k: str(v) for k, v in (adapters or {}).items()}
    return load_config(None, [f"model={json.dumps(str(model_dir))}", "model.dtype=float32", "serve.engine=hf",
                              f"serve.adapters={json.dumps(adapters)}",
                              "serve.decoding.max_new_tokens=8", "serve.max_tokens=900",
                              "serve.max_input_tokens=256", "serve.decoding.temperature=0",
                              # the tests send many bad requests from one address on purpose: no slowing down
                              "serve.abuse_refusals=0", *overrides])


@pytest.fixture
def server_log() -> Iterator[list[logging.LogRecord]]:
    """Every record of qatune's and uvicorn's loggers during the test."""
    with captured_logs() as records:
        yield records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    engine: Any
    app: Any

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one metric sample (0 when it has none yet)."""
        value = self.app.state.service.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


@pytest.fixture(scope="session")
def start_server():
    """start_server(config, start_engine=True) -> RunningServer; every server stops at the end of the session."""
    import uvicorn

    from qatune.runtime import Runtime
    from qatune.serve import recipe
    from qatune.serve.app import create_app
    from qatune.serve.connections import uvicorn_options

    running: list[tuple[uvicorn.Server, threading.Thread]] = []
    runtime = Runtime.detect()

    def start(config, start_engine: bool = True) -> RunningServer:
        """`recipe.setup`, then the app on a free port (`recipe.run` would block on the configured one)."""
        components = recipe.setup(recipe.plan(config, runtime))
        engine = components.engine
        if start_engine:
            engine.start()
        app = create_app(engine, config.serve, components.metrics)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_options(config.serve)))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        running.append((server, thread))
        return RunningServer(f"http://127.0.0.1:{port}", engine, app)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(start_server, tiny_model_dir, lora_adapters) -> Iterator[RunningServer]:
    """The shared open server (no API key): base model `tiny-...` plus adapters alpha and beta."""
    yield start_server(serve_config(tiny_model_dir, lora_adapters))


# One thread: the test machines are shared. 300 tokens at most: each of the 17 sequences of the cache then
# holds 556 cells (12 MiB), not 1,156.
LLAMACPP = ["serve.engine=llamacpp", "serve.llamacpp_threads=1", "serve.max_tokens=300"]


def llamacpp_config(*overrides: str):
    """The embedded default model (as the q8_0 GGUF the engine converts it to once) on the llamacpp engine, with
    the test limits of serve_config."""
    return serve_config(Path("default"), None, *LLAMACPP, *overrides)


@pytest.fixture(scope="session")
def llamacpp_server(start_server) -> Iterator[RunningServer]:
    """The default model served by llama.cpp (no API key)."""
    pytest.importorskip("llama_cpp", reason="the llamacpp engine needs llama-cpp-python (pip install 'qatune[llamacpp]')")
    yield start_server(llamacpp_config())


def pace_steps(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine step of `server` takes at least 5 ms for this test, so a long answer outlasts a client that
    leaves it: llama.cpp writes the default model's 300 tokens in about 0.3 s on a fast machine, and a client
    racing that proves nothing."""
    batcher = server.engine.batcher
    step = batcher._step

    def paced(admitted):
        time.sleep(0.005)
        return step(admitted)

    monkeypatch.setattr(batcher, "_step", paced)


def connect(server: RunningServer) -> socket.socket:
    url = urlparse(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def head(path: str, length: int | None, extra: str = "") -> bytes:
    """A raw POST head with a Content-Length, or chunked when `length` is None."""
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{size}{extra}\r\n"
            ).encode()


def leave_while_generating(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    """POST `body` to `path` over a socket of its own, and hang up as soon as the engine generates for it.

    The hang-up follows the first generated token, not a client timeout: with a timeout, when the client left
    depended on how busy the test process was, and CI twice saw an answer run its course."""
    payload = json.dumps(body).encode()
    deadline = time.time() + 30
    while server.engine.in_flight and time.time() < deadline:
        time.sleep(0.005)  # a request left before may still take a step: the next token counted must be this one's
    generated = server.metric("qatune_generated_tokens_total")
    with connect(server) as sock:
        sock.sendall(head(path, len(payload)) + payload)
        while server.metric("qatune_generated_tokens_total") == generated and time.time() < deadline:
            time.sleep(0.005)
        assert server.metric("qatune_generated_tokens_total") > generated, "the request never started generating"


@pytest.fixture(params=["hf", "llamacpp"])
def any_server(request) -> RunningServer:
    """Each engine's shared server in turn: hf on the tiny model with adapters, llamacpp on the default model."""
    return request.getfixturevalue("server" if request.param == "hf" else "llamacpp_server")


def engine_config(engine: str, tiny_model_dir: Path, *overrides: str):
    """A config for a server of its own on `engine` (hf: the tiny model; llamacpp: the default model)."""
    if engine == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the llamacpp engine needs llama-cpp-python")
        return llamacpp_config(*overrides)
    return serve_config(tiny_model_dir, None, *overrides)


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch) -> Path:
    """A test's GGUF conversions go to a cache of their own (the embedded models' Hugging Face folders are shared)."""
    from qatune.models import cache_dir

    cache = tmp_path / "qatune-cache"
    cache.mkdir()
    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    monkeypatch.setenv("QATUNE_CACHE", str(cache))
    return cache / "gguf"

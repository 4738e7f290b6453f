"""schemathesis fuzzes the whole HTTP surface of `qatune serve` from the server's own OpenAPI schema, valid and
invalid requests on every route, on both engines (hf on the tiny model, llamacpp on the embedded default model's
GGUF), with the API key off and on: never a 5xx, every refusal OpenAI's error JSON, no traceback in the log,
/health under 100 ms (p99) throughout, the server alive afterwards and its memory back near where it started.
The fast tier sends a few hundred cases per server; the slow tier 2,500 (issue 37 asks for 2,000)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.fuzzing import fuzz_surface
from tests.serve.conftest import RunningServer, engine_config

schemathesis = pytest.importorskip("schemathesis")
FAST, SLOW = 300, 2500
KEY = "fuzz-key"
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/answer"}
# Answers of 1-2 tokens to prompts of at most 64: every valid case still runs the engine, quickly.
SHORT = ["serve.max_tokens=2", "serve.decoding.max_new_tokens=1", "serve.max_input_tokens=64"]


def openai_error(response) -> bool:
    return bool(response.json()["error"]["message"])


def settled(server: RunningServer) -> None:
    """Wait for the streams the fuzzer left to be cancelled."""
    deadline = time.monotonic() + 10
    while server.engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.1)


def fuzz_server(start_server, tiny_model_dir, engine: str, key: str | None, cases: int) -> None:
    server = start_server(engine_config(engine, tiny_model_dir, *SHORT, *([f"serve.api_key={key}"] if key else [])))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    httpx.post(server.url + "/answer", json={"question": "warm up"}, headers=headers, timeout=60)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    assert {op.ok().path for op in schema.get_all_operations()} == ROUTES
    tally = fuzz_surface(f"serve {engine} key-{'on' if key else 'off'}", schema, server.url, cases, openai_error,
                         headers, settle=lambda: settled(server))
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    answer = httpx.post(server.url + "/answer", json={"question": "still there?"}, headers=headers, timeout=60)
    assert answer.status_code == 200 and isinstance(answer.json()["answer"], str)
    served = [s for m in server.app.state.service.metrics.registry.collect() for s in m.samples
              if s.name == "qatune_requests_total"]
    assert sum(s.value for s in served) >= tally.cases
    assert not [s.labels for s in served if s.labels["status"].startswith("5")]


@pytest.mark.parametrize("engine,key", [("hf", KEY), ("llamacpp", None)], ids=["hf-key-on", "llamacpp-key-off"])
def test_schemathesis_fast_tier(start_server, tiny_model_dir, engine, key):
    fuzz_server(start_server, tiny_model_dir, engine, key, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "llamacpp"])
@pytest.mark.parametrize("key", [None, KEY], ids=["key-off", "key-on"])
def test_schemathesis_finds_no_server_error(start_server, tiny_model_dir, engine, key):
    fuzz_server(start_server, tiny_model_dir, engine, key, SLOW)

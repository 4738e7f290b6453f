"""schemathesis fuzzes the whole HTTP surface from the server's own OpenAPI schema, valid and invalid
requests on every route, with the API key off and on: never a 5xx, every refusal OpenAI's error JSON,
the server alive afterwards and its memory back near where it started."""

from __future__ import annotations

import gc
import time

import httpx
import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import serve_config

schemathesis = pytest.importorskip("schemathesis")
CASES = 2500  # per server: 5,000 in all, across the six routes of the schema
KEY = "fuzz-key"
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/answer"}


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def fuzz(url: str, headers: dict[str, str]) -> dict[str, int]:
    """Send CASES schemathesis cases; returns how many each route got. Fails on the first 5xx."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    assert {op.ok().path for op in schema.get_all_operations()} == ROUTES
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[str, int] = {}
    session = requests.Session()

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def one(case) -> None:
        response = case.call(base_url=url, session=session, headers=headers, timeout=30)
        seen[case.operation.path] = seen.get(case.operation.path, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
        assert "Traceback" not in response.text
        if response.status_code >= 400:
            assert response.json()["error"]["message"], response.text

    one()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, KEY], ids=["key-off", "key-on"])
def test_schemathesis_finds_no_server_error(start_server, tiny_model_dir, lora_adapters, key):
    # Answers of 1-2 tokens to prompts of at most 64: every valid case still runs the engine, quickly.
    overrides = ["serve.max_tokens=2", "serve.decoding.max_new_tokens=1", "serve.max_input_tokens=64"] + \
        ([f"serve.api_key={key}"] if key else [])
    server = start_server(serve_config(tiny_model_dir, lora_adapters, *overrides))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    httpx.post(server.url + "/answer", json={"question": "warm up"}, headers=headers, timeout=60)
    baseline = rss_mb()
    seen = fuzz(server.url, headers)
    assert sum(seen.values()) >= CASES * 0.9 and set(seen) == ROUTES, seen
    deadline = time.monotonic() + 10
    while server.engine.in_flight and time.monotonic() < deadline:  # streams the fuzzer left are cancelled
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    answer = httpx.post(server.url + "/answer", json={"question": "still there?"}, headers=headers, timeout=60)
    assert answer.status_code == 200 and isinstance(answer.json()["answer"], str)
    served = [s for m in server.app.state.service.metrics.registry.collect() for s in m.samples
              if s.name == "qatune_requests_total"]
    assert sum(s.value for s in served) >= sum(seen.values())
    assert not [s.labels for s in served if s.labels["status"].startswith("5")]
    assert rss_mb() - baseline < 200, f"memory grew from {baseline:.0f} MB to {rss_mb():.0f} MB"

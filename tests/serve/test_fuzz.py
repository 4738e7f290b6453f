"""1,000 random or malformed request bodies: never a 5xx, never a stack trace, and the server lives."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUTES = ["/v1/chat/completions", "/v1/completions", "/answer"]

scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=40)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "", "USER"])
                                 | anything,
                                 "content": st.text(max_size=60) | anything})
near_valid = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["alpha", "beta", "nope", ""]) | anything,
    "messages": st.lists(message, max_size=3) | anything,
    "prompt": st.text(max_size=60) | anything,
    "question": st.text(max_size=60) | anything,
    "max_tokens": st.integers(-5, 2000) | anything,
    "temperature": st.floats(-1, 3, allow_nan=False) | anything,
    "top_p": st.floats(-0.5, 1.5, allow_nan=False) | anything,
    "stop": st.lists(st.text(max_size=5), max_size=6) | st.text(max_size=5) | anything,
    "stream": st.booleans() | anything,
    "n": st.integers(0, 3),
    "seed": st.integers(-10**20, 10**20),
    "stream_options": anything,
})
body = st.one_of(near_valid.map(json.dumps), anything.map(json.dumps), st.binary(max_size=80))


@pytest.fixture(scope="module", params=["hf", "llamacpp"])
def http(request):
    """A client of each engine's shared server (the routes and limits are the app's; answers are the engine's)."""
    server = request.getfixturevalue("server" if request.param == "hf" else "llamacpp_server")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), payload=body)
def test_random_bodies_never_crash_the_server(http, route, payload):
    response = http.post(route, content=payload, headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, payload, response.text)
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_the_server_is_alive_after_the_fuzzing(http):
    assert http.get("/health").json()["status"] == "ok"
    answer = http.post("/answer", json={"question": "still there?"})
    assert answer.status_code == 200 and "answer" in answer.json()

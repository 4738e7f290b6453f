"""Issue 37, strings at the edge: invalid Unicode (a lone UTF-16 surrogate, as JSON's `\\ud800` carries it), NUL,
control and right-to-left characters in prompts and model names, on both engines. Each is refused with a 422
naming the field or answered as text; never a 500, never a traceback in the log."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from qatune.text_input import check_name, check_text, printable

SURROGATE = "\ud800"


def post(server, route: str, body: dict) -> httpx.Response:
    """`body` as an attacker sends it: json.dumps escapes the lone surrogate as `\\ud800`, which is valid JSON."""
    return httpx.post(server.url + route, content=json.dumps(body).encode("ascii"),
                      headers={"Content-Type": "application/json"}, timeout=60)


def no_traceback(log: list[logging.LogRecord]) -> None:
    assert not [r for r in log if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in log]


# (route, body with the bad string in one field, the field the refusal names)
FIELDS = [
    ("/v1/completions", lambda s: {"prompt": f"fever{s}?"}, "prompt"),
    ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": s}]}, "messages.0.content"),
    ("/v1/chat/completions", lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]},
     "messages.0.content"),
    ("/v1/completions", lambda s: {"prompt": "hi", "stop": [s]}, "stop"),
    ("/answer", lambda s: {"question": s}, "question"),
    ("/answer", lambda s: {"question": "hi", "model": s}, "model"),
    ("/v1/chat/completions", lambda s: {"model": s, "messages": [{"role": "user", "content": "hi"}]}, "model"),
]


@pytest.mark.parametrize("bad", [SURROGATE, "a\x00b"], ids=["lone-surrogate", "nul"])
@pytest.mark.parametrize("route,body,field", FIELDS, ids=[f"{r}:{f}" for r, _, f in FIELDS])
def test_invalid_unicode_is_a_422_naming_the_field(any_server, server_log, route, body, field, bad):
    response = post(any_server, route, {"max_tokens": 2, **body(bad)})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"].startswith(field) and field in error["message"], error
    assert "Traceback" not in response.text
    no_traceback(server_log)


@pytest.mark.parametrize("text", ["\u202eevil\u202c fever? 发烧了 \u05e9\u05dc\u05d5\u05dd", "bell\x07 tab\t esc\x1b[31m",
                                  "😷 \U0001d400 e\u0301"], ids=["rtl-mixed-scripts", "controls", "astral-combining"])
def test_odd_but_valid_text_in_a_prompt_is_answered_as_text(any_server, server_log, text):
    for route, body in [("/v1/completions", {"prompt": text}), ("/answer", {"question": text}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})]:
        response = post(any_server, route, {"max_tokens": 2, **body})
        assert response.status_code == 200, (route, response.text)
    no_traceback(server_log)


@pytest.mark.parametrize("name", ["tiny\u202e", "tiny\x1b", "tiny\u2066"])
def test_a_model_name_with_an_invisible_character_is_refused(server, name):
    response = post(server, "/v1/completions", {"prompt": "hi", "model": name})
    assert response.status_code == 422 and response.json()["error"]["param"] == "model", response.text
    assert f"U+{ord(name[-1]):04X}" in response.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": "\xc0\xaf"}', b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": "\xff\xfe"}',
                                 b'{"prompt": "\\ud800\\u"}', b'{"prompt": "\\x41"}'],
                         ids=["overlong-utf8", "utf8-encoded-surrogate", "not-utf8", "cut-escape", "bad-escape"])
def test_bytes_that_are_not_json_text_are_a_4xx(server, server_log, raw):
    response = httpx.post(server.url + "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500 and response.json()["error"]["message"], response.text
    no_traceback(server_log)


def test_the_edge_checks():
    assert check_text("\u202e 发烧 \x07\n") == "\u202e 发烧 \x07\n"  # text: anything a person could paste
    assert check_name("runs/my-run_1.jsonl") == "runs/my-run_1.jsonl"
    for bad in (SURROGATE, "\udfff", "a\x00"):
        for check in (check_text, check_name):
            with pytest.raises(ValueError):
                check(bad)
    for bad in ("a\u202eb", "a\x1bb", "a\x85", "a\u200fb", "a\nb"):
        with pytest.raises(ValueError, match="U\\+"):
            check_name(bad)
    assert printable("k\ud800") == "k\\ud800"

"""Issue 37 in the studio: a lone surrogate, a NUL or an invisible character in a path, a run name or a form
field is a 422 naming the field (or a 4xx of the path checks), never a 500; the workspace is untouched."""

from __future__ import annotations

import json

import httpx
import pytest

BAD = {"lone-surrogate": "\ud800", "nul": "a\x00b", "rtl-override": "evil\u202elmth.jsonl"}

# (route, body with the bad string in one field, the field the refusal names)
BODIES = [
    ("/api/check", lambda s: {"path": s}, "path"),
    ("/api/check", lambda s: {"path": "data/qa.jsonl", "encoding": s}, "encoding"),
    ("/api/train/check", lambda s: {"run": s}, "run"),
    ("/api/train", lambda s: {"run": "r", "sources": [s]}, "sources.0"),
    ("/api/prepare", lambda s: {"run": "r", "values": {s: "1"}}, "values"),
    ("/api/export", lambda s: {"run": "r", "base": s}, "base"),
    ("/api/eval", lambda s: {"run": "r", "data": s}, "data"),
    ("/api/chat", lambda s: {"run": s}, "run"),
    ("/api/summarize", lambda s: {"sheet": s}, "sheet"),
]


@pytest.fixture
def studio(tmp_path, start_studio):
    return start_studio(tmp_path / "ws")


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_a_bad_string_in_a_body_is_a_422_naming_the_field(studio, bad):
    with httpx.Client(base_url=studio.url) as client:
        for route, body, field in BODIES:
            response = client.post(route, content=json.dumps(body(bad)).encode("ascii"),
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (route, response.text)
            assert response.json()["field"].startswith(field) and "Traceback" not in response.text
    assert not (studio.workspace / ".studio").exists() or not list((studio.workspace / ".studio").rglob("*.json"))


def test_a_page_setting_is_checked_as_text(studio):
    """`extra` settings are text (a system prompt may hold newlines and right-to-left marks): the edge refuses only
    what is not text at all; the page's own check then refuses a key it may not add."""
    with httpx.Client(base_url=studio.url) as client:
        for value, status in (("\ud800", 422), ("\u202e", 403)):
            body = {"run": "r", "extra": [f"export.output_dir={value}"]}
            response = client.post("/api/export", content=json.dumps(body).encode(),
                                    headers={"Content-Type": "application/json"})
            assert response.status_code == status, response.text


@pytest.mark.parametrize("path", ["/api/jobs/a%00b", "/api/runs/r%E2%80%AE", "/files/data%00.jsonl",
                                  "/api/reports/a%1b.json", "/api/files?under=%00", "/api/prepared/%E2%81%A6r",
                                  "/api/jobs/x%0Ay/problems"])
def test_a_bad_character_in_a_url_path_is_a_422(studio, path):
    response = httpx.get(studio.url + path)
    assert response.status_code == 422 and response.json()["error"].startswith("invalid request"), response.text


def test_an_upload_to_a_bad_name_is_refused_and_writes_nothing(studio):
    for name in ("a%00b.jsonl", "data/evil%E2%80%AEl.jsonl", "data/x%0D.jsonl"):
        assert httpx.put(f"{studio.url}/api/files/{name}", content=b"{}\n").status_code == 422, name
    assert not (studio.workspace / "data").exists()

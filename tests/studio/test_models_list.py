"""The studio offers the embedded models (`default`, `gemma-3-270m`) from `qatune.models.embedded_models`: the
schema lists them, a run or a job on a run takes one by its name (never as a workspace path), and each page's
model box offers them in the browser."""

from __future__ import annotations

import shutil

import httpx
import pytest

from qatune.config import load_config
from qatune.models import EMBEDDED_MODELS, GEMMA_MODEL, embedded_models
from tests.serve.test_page import CHROMIUM_FLAGS


def test_every_embedded_model_has_its_line_default_first():
    listed = embedded_models()
    assert list(listed) == list(EMBEDDED_MODELS) == ["default", GEMMA_MODEL]
    assert all(line and "\n" not in line for line in listed.values())


def test_the_schema_lists_them_and_a_run_picks_gemma(tmp_path, start_studio):
    studio = start_studio(tmp_path / "ws")
    with httpx.Client(base_url=studio.url) as client:
        schema = client.get("/api/schema").json()
        assert schema["models"] == [{"name": n, "description": d} for n, d in embedded_models().items()]
        preset = schema["presets"]["LoRA on gemma-3-270m (Chinese)"]
        assert preset["model.name_or_path"] == GEMMA_MODEL

        body = {"run": "zh", "sources": ["data/qa.jsonl"], "values": {"model.name_or_path": GEMMA_MODEL}}
        verdict = client.post("/api/train/check", json=body).json()
        assert verdict["ok"] and verdict["overrides"][0] == f"model.name_or_path={GEMMA_MODEL}"
        assert load_config(None, verdict["overrides"]).model.name_or_path == GEMMA_MODEL

        body["values"] = {"model.name_or_path": "../elsewhere"}  # anything else is still a workspace folder
        assert client.post("/api/train/check", json=body).status_code == 403


def test_jobs_on_a_run_take_an_embedded_base_by_its_name(recorded_jobs):
    from fastapi.testclient import TestClient

    from qatune.cli import parse_args

    app, started = recorded_jobs
    job = {"base": GEMMA_MODEL, "run": "zh"}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for path, body in (("/api/eval", {**job, "data": "data/qa.jsonl"}), ("/api/export", job), ("/api/chat", job)):
            assert client.post(path, json=body).status_code == 200, path
    evaluate, export, chat = (parse_args(j.args) for j in started)
    assert evaluate.compare == [GEMMA_MODEL, "runs/zh"]
    assert export.model == chat.model == GEMMA_MODEL


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if not executable:
        pytest.skip("Debian's chromium is needed for the page test: apt-get install chromium (make browser)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_each_model_box_offers_the_embedded_models(tmp_path, start_studio, browser):
    studio = start_studio(tmp_path / "ws")
    page = browser.new_page()
    offered = "[...document.querySelectorAll('#embedded-models option')].map(o => o.value)"
    for route, box in (("data", "#model"), ("train", "#f-model\\.name_or_path"), ("eval", "#base"),
                       ("chat", "#base"), ("export", "#base")):
        page.goto(f"{studio.url}/{route}")
        page.wait_for_selector("#embedded-models option", state="attached")
        assert page.evaluate(offered) == list(embedded_models()), route
        assert page.get_attribute(box, "list") == "embedded-models", route
    page.fill("#base", GEMMA_MODEL)  # the export page's box takes the name as typed or picked
    assert page.input_value("#base") == GEMMA_MODEL

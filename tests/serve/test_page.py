"""The chat page in headless Chromium (Debian's chromium, driven by playwright): open it, ask, see the
answer stream in, ask again with the history."""

from __future__ import annotations

import shutil

import httpx
import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for the page test: apt-get install chromium (make test does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.mark.slow
def test_page_streams_an_answer(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3")
    page.select_option("#model", "beta")
    page.fill("#question", "感冒了应该多喝水吗？")
    page.click("#send")
    answer = page.locator(".turn.assistant").last
    page.wait_for_function("document.querySelector('.turn.assistant:last-child')?.dataset.state === 'done'",
                           timeout=30000)
    streamed = answer.inner_text()
    assert int(answer.get_attribute("data-chunks")) >= 2, "the answer did not arrive in pieces"
    direct = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "beta", "messages": [{"role": "user", "content": "感冒了应该多喝水吗？"}]}).json()
    assert streamed.strip() == direct["choices"][0]["message"]["content"].strip()  # temperature 0 on this server

    page.fill("#question", "Why?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant').length === 2 && "
                           "document.querySelector('.turn.assistant:last-child').dataset.state === 'done'",
                           timeout=30000)
    assert page.locator(".turn.user").all_inner_texts() == ["感冒了应该多喝水吗？", "Why?"]
    page.close()


@pytest.mark.slow
def test_page_shows_an_error_message(start_server, tiny_model_dir, browser):
    from tests.serve.conftest import serve_config

    server = start_server(serve_config(tiny_model_dir, None, "serve.api_key=k", "serve.max_input_tokens=8"))
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector(".turn.error")  # the model list needs the key
    assert "API key" in page.locator(".turn.error").first.inner_text()
    page.fill("#key", "k")
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length === 1")
    page.fill("#question", "a question far longer than eight tokens, so the server refuses it")
    page.click("#send")
    page.wait_for_function("document.querySelector('.turn:last-child').dataset.state === 'error'")
    assert "serve.max_input_tokens" in page.locator(".turn.error").last.inner_text()
    page.close()

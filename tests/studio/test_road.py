"""The whole road in real Chromium (Debian's chromium, driven by playwright), from an empty workspace
with only the tiny random Llama in it: upload data with one malformed line, see the check name it, fix
it, prepare, see the schema's message for a bad field, train (60 tiny steps) while the loss chart gains points,
stop and resume, compare base and tuned, chat with the run, export a GGUF. Screenshots of every page
go to a temporary folder (and to QATUNE_STUDIO_SCREENSHOTS when set: the README's come from there)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import PAIRS
from tests.serve.test_page import CHROMIUM_FLAGS

RECORDS = [{"question": q, "answer": a} for q, a in PAIRS]
BAD_LINE = 3
STEPS = 60


def jsonl(records: list[dict], broken: int | None = None) -> bytes:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if broken:
        lines[broken - 1] = lines[broken - 1][:-12]  # cut inside the answer: not JSON any more
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed for the studio test: apt-get install chromium (make browser)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Road:
    """The page, with the clicks counted and the screenshots taken."""

    def __init__(self, page, url: str, shots: list[Path]) -> None:
        self.page, self.url, self.shots, self.clicks = page, url, shots, 0
        self.started = time.perf_counter()

    def go(self, name: str) -> None:
        self.click(f"#nav-{name}")

    def click(self, selector: str) -> None:
        self.page.click(selector)
        self.clicks += 1

    def select(self, selector: str, value: str) -> None:
        self.page.select_option(selector, value)
        self.clicks += 1

    def pick_file(self, selector: str, name: str, content: bytes) -> None:
        self.page.set_input_files(selector, files=[{"name": name, "mimeType": "text/plain", "buffer": content}])
        self.clicks += 2  # the button, then the file in the dialog

    def until(self, script: str, timeout: float = 120) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.wait_for_function(script, timeout=timeout * 1000)
        except PlaywrightTimeout:  # say what the page showed: a run that failed, or one still going
            shown = self.page.evaluate("(document.getElementById('progress-state')?.dataset.state || '') + '\\n' + "
                                       "(document.getElementById('log')?.textContent || '')")
            raise AssertionError(f"waited {timeout} s for {script}; the page shows:\n{shown}") from None

    def shot(self, name: str, top: bool = True) -> None:
        print(f"{name}: {time.perf_counter() - self.started:.1f} s", flush=True)
        if top:
            self.page.evaluate("window.scrollTo(0, 0)")
        for folder in self.shots:
            folder.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(folder / f"studio-{name}.png"), full_page=False)


@pytest.mark.slow
def test_the_whole_road_in_chromium(tmp_path, tiny_model_dir, browser, start_studio):
    workspace = tmp_path / "ws"
    shutil.copytree(tiny_model_dir, workspace / "models" / "tiny")
    studio = start_studio(workspace)
    shots = [tmp_path / "screens"] + ([Path(os.environ["QATUNE_STUDIO_SCREENSHOTS"])]
                                      if os.environ.get("QATUNE_STUDIO_SCREENSHOTS") else [])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(studio.url + "/")
    road = Road(page, studio.url, shots)

    # Data: upload a file with one malformed line; the check names the file and the line.
    road.pick_file("#upload", "qa.jsonl", jsonl(RECORDS, broken=BAD_LINE))
    page.wait_for_selector("#files .source")
    road.click("#check")
    road.until("document.querySelector('#check-summary').dataset.problems !== undefined")
    rows = page.locator("#problems tr.problem")
    assert rows.count() == 1
    assert rows.first.locator("td").all_inner_texts()[:4] == ["data/qa.jsonl", str(BAD_LINE), "", "malformed"]
    road.shot("data-check")
    road.pick_file("#upload", "qa.jsonl", jsonl(RECORDS))  # fixed
    road.click("#check")
    road.until("document.querySelector('#check-summary').dataset.problems === '0'")
    assert f"{len(RECORDS)} usable" in page.inner_text("#check-summary")
    road.click("#files .source")  # train on it
    page.fill("#run", "road")
    page.fill("#model", "models/tiny")
    page.dispatch_event("#model", "change")
    page.dispatch_event("#run", "change")
    road.click("#prepare")
    page.wait_for_selector("#report img", timeout=120_000)
    assert "qa" in page.inner_text("#report table") and (workspace / "prepared/road/data_report.json").is_file()
    road.shot("data")

    # Train: the schema's message for a bad value, inline; then the run, stopped and resumed.
    road.go("train")
    page.wait_for_selector("#form .field")
    page.fill("#f-train\\.learning_rate", "-1")
    page.wait_for_function("document.getElementById('problem-train.learning_rate').textContent !== ''")
    problem = page.inner_text("#problem-train\\.learning_rate")
    assert problem.startswith("train.learning_rate: Input should be greater than 0; got -1")
    assert page.is_disabled("#start")
    page.evaluate("document.getElementById('field-train.learning_rate').scrollIntoView({block: 'center'})")
    road.shot("train-error", top=False)
    # 60 tiny steps (~0.1 s each idle), evaluated every 20: Stop lands mid-run on a fast machine too
    settings = {"model.name_or_path": "models/tiny", "train.learning_rate": "1e-3", "train.max_steps": str(STEPS),
                "train.logging_steps": "1", "train.eval_steps": "20", "train.per_device_batch_size": "4",
                "train.gradient_accumulation_steps": "1", "train.preview_questions": "0"}
    for key, value in settings.items():
        page.fill(f"#f-{key.replace('.', chr(92) + '.')}", value)
    page.wait_for_function("!document.getElementById('start').disabled && "
                           "document.querySelector('#command code')?.textContent.includes('train.preview_questions=0')")
    command = page.inner_text("#command code")
    assert "qatune train model.name_or_path=models/tiny 'data.sources=[data/qa.jsonl]'" in command
    assert f"train.max_steps={STEPS}" in command and "train.learning_rate=1e-3" in command
    road.click("#start")
    road.until("Number(document.getElementById('chart').dataset.trainPoints) >= 1")
    road.click("#stop")  # SIGINT: the step ends, a checkpoint is saved
    road.until("document.getElementById('progress-state').dataset.state === 'stopped'")
    stopped_at = int(page.get_attribute("#chart", "data-train-points"))
    assert 1 <= stopped_at < STEPS
    road.shot("train-stopped")
    road.click("#resume")
    # the resumed run restarts a process and reloads the model: minutes on a loaded 2-core machine
    road.until("document.getElementById('progress-state').dataset.state === 'complete'", timeout=300)
    assert page.get_attribute("#chart", "data-train-points") == str(STEPS)
    assert int(page.get_attribute("#chart", "data-eval-points")) >= 2
    report = json.loads((workspace / "runs/road/train_report.json").read_text())
    assert report["global_step"] == STEPS and report["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert report["data_reused"]  # the data prepared on the Data page, same inputs
    assert "complete" in page.inner_text("#runs tr[data-run=road]")
    road.shot("train")

    # Evaluate: base against tuned, the report in place, the review sheet out and back, summarized.
    road.go("eval")
    page.wait_for_function("document.querySelector('#run').value === 'road'")
    page.fill("#base", "models/tiny")
    page.dispatch_event("#base", "change")
    page.fill("#extra", "eval.max_samples=2 eval.decoding.max_new_tokens=4")
    road.click("#compare")
    road.until("document.getElementById('eval-job').dataset.state === 'done'", 240)
    page.frame_locator("#report").locator("table").first.wait_for()
    assert "tuned" in page.frame_locator("#report").locator("body").inner_text()
    with page.expect_download() as download:
        road.click("#sheet-link")
    sheet = Path(download.value.path()).read_text(encoding="utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(sheet)))
    assert len(rows) == 4 and all(r["score"] == "" for r in rows)  # 2 questions x base and tuned
    for i, row in enumerate(rows):
        row["score"] = str(i % 5 + 1)
    scored = io.StringIO()
    writer = csv.DictWriter(scored, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    road.pick_file("#sheet", "review_sheet.csv", scored.getvalue().encode("utf-8-sig"))
    page.wait_for_function("document.getElementById('sheet-state').textContent.startsWith('uploaded')")
    road.click("#summarize")
    road.until("document.getElementById('summary-job').dataset.state === 'done'")
    assert "Expert scores" in page.inner_text("#summary-job pre")
    road.shot("eval")

    # Chat: the service's own page, against the run.
    road.go("chat")
    page.wait_for_function("document.querySelector('#run').value === 'road'")
    page.fill("#extra", "serve.decoding.max_new_tokens=8")
    road.click("#start")
    page.wait_for_selector("#chat:not([hidden])", timeout=120_000)
    chat = page.frame_locator("#chat")
    chat.locator("#model option[value=road]").wait_for(state="attached")
    chat.locator("#model").select_option("road")
    road.clicks += 1
    chat.locator("#question").fill("What is the capital of France?")
    chat.locator("#send").click()
    road.clicks += 1
    answer = chat.locator(".turn.assistant").last
    answer.wait_for()
    for _ in range(600):  # the frame is another origin: polled from here
        if answer.get_attribute("data-state") != "streaming":
            break
        page.wait_for_timeout(100)
    assert answer.get_attribute("data-state") == "done" and int(answer.get_attribute("data-chunks")) >= 1
    road.shot("chat")
    road.click("#stop")

    # Export: a GGUF file with the report's checks.
    road.go("export")
    page.wait_for_function("document.querySelector('#run').value === 'road'")
    road.select("#gguf", "f16")
    page.fill("#extra", "export.check_max_new_tokens=4")
    road.click("#export")
    road.until("document.getElementById('export-job').dataset.state === 'done'", 300)
    page.wait_for_selector("#export-files")
    assert "model-f16.gguf" in page.inner_text("#export-files")
    assert (workspace / "exports/road/model-f16.gguf").read_bytes()[:4] == b"GGUF"
    road.shot("export")

    # Runs are folders: a studio started again on the workspace lists the run with its state.
    again = start_studio(workspace)
    listed = httpx.get(again.url + "/api/runs").json()["runs"]
    assert [(r["run"], r["state"], r["step"]) for r in listed] == [("road", "complete", STEPS)]
    commands = [j["command"] for j in httpx.get(again.url + "/api/jobs").json()["jobs"]]
    assert any(c.startswith("qatune export --model models/tiny --adapter runs/road --out exports/road --gguf f16")
               for c in commands)
    print(f"\nclicks for the whole road: {road.clicks}")
    page.close()

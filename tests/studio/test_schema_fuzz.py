"""Issue 37 on `qatune studio`: schemathesis over the studio's own OpenAPI schema (every route, valid and invalid
requests) and a hypothesis state machine of its jobs (upload, start, stop, resume, read), over real HTTP. Never a
5xx, every refusal `{"error": ...}`, no traceback in the log, the job list answering under 100 ms (p99)
throughout, memory back near where it started. Jobs run a stand-in for the CLI (`fake_qatune.py`): the HTTP
surface is what is fuzzed here, and a real `qatune` per case would take the machine's cores for minutes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.fuzzing import captured_logs, fuzz_surface, tracebacks

schemathesis = pytest.importorskip("schemathesis")
FAST, SLOW = 300, 2000
TOKEN = "fuzz-token"
FAKE = (sys.executable, str(Path(__file__).with_name("fake_qatune.py")), "qatune")
QA = b'{"question": "What helps a fever?", "answer": "Rest and fluids."}\n' * 3
# An endless event stream (a page reads it until it leaves): schemathesis would wait on it until its timeout.
ENDLESS = "/api/runs/{run}/events"


def studio_error(response) -> bool:
    """The studio's refusals are `{"error": ...}`; Starlette's own 404/405 for a path no route has say `detail`."""
    body = response.json()
    return bool(body.get("error") or body.get("detail"))


def fuzzed_studio(start_studio, workspace: Path, **options):
    """A studio over a workspace with a data file and a run folder, its jobs run by the stand-in."""
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "qa.jsonl").write_bytes(QA)
    (workspace / "runs" / "r").mkdir(parents=True)
    studio = start_studio(workspace, **options)
    studio.app.state.studio.runner.program = FAKE
    return studio


def fuzz_studio(start_studio, workspace: Path, cases: int, token: str | None) -> None:
    studio = fuzzed_studio(start_studio, workspace, token=token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    schema = schemathesis.openapi.from_url(studio.url + "/openapi.json", headers=dict(headers)).exclude(path=ENDLESS)
    fuzz_surface(f"studio token-{'on' if token else 'off'}", schema, studio.url, cases, studio_error, headers,
                 probe="/api/jobs")


def test_schemathesis_fast_tier(tmp_path, start_studio):
    fuzz_studio(start_studio, tmp_path / "ws", FAST, None)


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, TOKEN], ids=["token-off", "token-on"])
def test_schemathesis_finds_no_server_error(tmp_path, start_studio, token):
    fuzz_studio(start_studio, tmp_path / "ws", SLOW, token)


NAMES = st.sampled_from(["qa.jsonl", "b.json", "c.csv", "notes.md", "x\u202e.jsonl", "%00.jsonl", "..%2Fout.jsonl"])
RUNS = st.sampled_from(["r", "r2", "bad run", "../r"])


class StudioJobs(RuleBasedStateMachine):
    """Random sequences of what the pages do with jobs; every answer is 2xx or the 4xx that says why."""

    uploads = Bundle("uploads")
    jobs = Bundle("jobs")

    def __init__(self, url: str) -> None:
        super().__init__()
        self.client = httpx.Client(base_url=url, timeout=30)
        self.started: set[str] = set()

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        assert response.status_code < 500 and "Traceback" not in response.text, (method, path, response.text[:300])
        if response.status_code >= 400:
            assert studio_error(response), response.text
        return response

    def started_job(self, response: httpx.Response) -> str | None:
        if response.status_code != 200:
            assert response.status_code in (400, 403, 404, 409, 422), response.text
            return None
        self.started.add(response.json()["id"])
        return response.json()["id"]

    @rule(target=uploads, name=NAMES, content=st.one_of(st.just(QA), st.binary(max_size=300)))
    def upload(self, name, content):
        response = self.call("PUT", f"/api/files/data/{name}", content=content)
        assert response.status_code in (200, 403, 422), response.text
        return f"data/{name}"

    @rule(target=jobs, path=uploads)
    def check(self, path):
        return self.started_job(self.call("POST", "/api/check", json={"path": path}))

    @rule(target=jobs, run=RUNS, sources=st.lists(uploads, max_size=2), resume=st.booleans())
    def train(self, run, sources, resume):
        response = self.call("POST", "/api/train", params={"resume": resume}, json={"run": run, "sources": sources})
        return self.started_job(response)

    @rule(target=jobs, run=RUNS)
    def export(self, run):
        return self.started_job(self.call("POST", "/api/export", json={"run": run}))

    @rule(job=jobs)
    def stop(self, job):
        if job:
            assert self.call("POST", f"/api/jobs/{job}/stop").json()["id"] == job

    @rule(job=jobs, offset=st.integers(-5, 10**6))
    def read(self, job, offset):
        if job:
            response = self.call("GET", f"/api/jobs/{job}", params={"offset": offset})
            assert response.status_code == (200 if offset >= 0 else 422)

    @rule(run=RUNS)
    def view_run(self, run):
        self.call("GET", f"/api/runs/{run}")

    @invariant()
    def every_started_job_is_listed_once(self):
        listed = [j["id"] for j in self.call("GET", "/api/jobs").json()["jobs"]]
        assert len(listed) == len(set(listed)) and self.started <= set(listed)

    def teardown(self):
        self.client.close()


def test_jobs_state_machine_never_sees_a_5xx(tmp_path, start_studio):
    studio = fuzzed_studio(start_studio, tmp_path / "ws")
    with captured_logs() as log:
        run_state_machine_as_test(lambda: StudioJobs(studio.url), settings=settings(
            max_examples=50, stateful_step_count=15, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(HealthCheck)))
    assert not tracebacks(log), tracebacks(log)[:3]
    records = [json.loads(p.read_text()) for p in (studio.workspace / ".studio" / "jobs").glob("*/job.json")]
    print(f"\nstudio jobs state machine: 50 sequences of up to 15 steps, {len(records)} jobs started", flush=True)

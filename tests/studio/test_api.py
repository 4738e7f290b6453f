"""The studio's API over real HTTP: paths stay in the workspace, uploads are bounded, the token and
the Host are checked, the form speaks the config loader's words, and jobs are real `qatune` processes."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from qatune.config import load_config
from qatune.errors import ConfigError
from qatune.studio.jobs import JobConflict, JobRunner
from qatune.studio.paths import PathRefused, Workspace
from qatune.studio.progress import curves
from tests.serve.conftest import free_port


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.jsonl").write_text('{"question": "q", "answer": "private"}\n')
    return folder


def test_paths_stay_in_the_workspace(tmp_path, outside):
    space = Workspace(tmp_path / "ws")
    (space.root / "data").mkdir()
    (space.root / "data" / "inner.jsonl").write_text("{}\n")
    (space.root / "escape").symlink_to(outside, target_is_directory=True)
    (space.root / "data" / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    (space.root / "alias.jsonl").symlink_to(space.root / "data" / "inner.jsonl")

    assert space.resolve("data/inner.jsonl") == space.root / "data" / "inner.jsonl"
    assert space.resolve("alias.jsonl") == space.root / "data" / "inner.jsonl"  # a link that stays inside is fine
    assert space.resolve(str(space.root / "data")) == space.root / "data"
    for bad in ("../outside/secret.jsonl", "data/../../outside", "data/..", "..\\outside", str(outside / "secret.jsonl"),
                "escape/secret.jsonl", "escape", "data/leak.jsonl", "/etc/passwd", ""):
        with pytest.raises(PathRefused):
            space.resolve(bad)


def test_http_refuses_traversal_and_symlink_escape(tmp_path, outside, start_studio):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "escape").symlink_to(outside, target_is_directory=True)
    (ws / "leak.jsonl").symlink_to(outside / "secret.jsonl")
    studio = start_studio(ws)
    with httpx.Client(base_url=studio.url) as client:
        for path in ("/files/leak.jsonl", "/files/escape/secret.jsonl", "/files/..%2Foutside%2Fsecret.jsonl",
                     "/files/%2Fetc%2Fpasswd"):
            response = client.get(path)
            assert response.status_code == 403, path
            assert "private" not in response.text and "root:" not in response.text
        for path in ("/api/files/..%2Fplanted.jsonl", "/api/files/escape/planted.jsonl", "/api/files/leak.jsonl"):
            assert client.put(path, content=b"{}\n").status_code == 403, path
        assert not (tmp_path / "planted.jsonl").exists() and not (outside / "planted.jsonl").exists()
        assert (outside / "secret.jsonl").read_text().endswith("private\"}\n")  # not overwritten through the link
        check = client.post("/api/check", json={"path": "escape/secret.jsonl"})
        assert check.status_code == 403 and "outside the workspace" in check.json()["error"]
        train = client.post("/api/train/check", json={"run": "r", "sources": ["../outside/secret.jsonl"]})
        assert train.status_code == 403
        assert client.post("/api/train/check", json={"run": "../r", "sources": []}).status_code == 403
        export = client.post("/api/export", json={"run": "r", "extra": ["export.output_dir=/tmp/x"]})
        assert export.status_code == 403  # a page adds settings, never a path

        # A file inside is served, in a sandbox (a workspace page never runs with the studio's origin).
        assert client.put("/api/files/data/ok.jsonl", content=b'{"question": "a b", "answer": "c d"}\n').json() == \
            {"path": "data/ok.jsonl", "bytes": 37}
        served = client.get("/files/data/ok.jsonl")
        assert served.status_code == 200 and served.headers["content-security-policy"] == "sandbox"


def test_uploads_are_size_limited(tmp_path, start_studio):
    studio = start_studio(tmp_path / "ws", max_upload_bytes=1000)
    with httpx.Client(base_url=studio.url) as client:
        assert client.put("/api/files/data/small.jsonl", content=b"x" * 1000).status_code == 200
        assert client.put("/api/files/data/big.jsonl", content=b"x" * 1001).status_code == 413

        def chunks():  # no Content-Length: the limit holds while the body streams in
            for _ in range(5):
                yield b"x" * 400

        assert client.put("/api/files/data/streamed.jsonl", content=chunks()).status_code == 413
    assert sorted(p.name for p in (studio.workspace / "data").iterdir()) == ["small.jsonl"]  # no partial file left


def test_token_and_host(tmp_path, start_studio):
    studio = start_studio(tmp_path / "ws", token="s3cret")
    with httpx.Client(base_url=studio.url) as client:
        assert client.get("/api/runs").status_code == 401
        assert client.get("/data").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).json() == {"runs": []}
        opened = client.get("/train?token=s3cret", follow_redirects=True)  # the link `qatune studio --token` prints: sets the cookie
        assert opened.status_code == 200 and "qatune studio: train" in opened.text
        assert client.get("/api/runs").status_code == 200  # the cookie now goes with every request
    with httpx.Client(base_url=studio.url) as client:
        response = client.get("/api/runs", headers={"Authorization": "Bearer s3cret", "Host": "evil.example"})
        assert response.status_code == 400 and "Host" in response.json()["error"]


def test_form_is_the_schema_and_speaks_the_loaders_words(tmp_path, start_studio):
    studio = start_studio(tmp_path / "ws")
    with httpx.Client(base_url=studio.url) as client:
        schema = client.get("/api/schema").json()
        fields = {f["key"]: f for f in schema["fields"]}
        assert fields["train.learning_rate"]["default"] == "0.002"
        assert fields["method.name"]["kind"] == "choice" and "qlora" in fields["method.name"]["choices"]
        assert fields["method.target_modules"]["default"] == "[q_proj, k_proj, v_proj, o_proj]"
        assert all(f["description"] for f in schema["fields"])
        assert "train.output_dir" not in fields  # the run's folder is the studio's: runs/RUN

        body = {"run": "r1", "sources": ["data/qa.jsonl"],
                "values": {"train.learning_rate": "-1", "train.save_steps": "3", "method.lora_rank": "8"}}
        verdict = client.post("/api/train/check", json=body).json()
        with pytest.raises(ConfigError) as loader:
            load_config(None, ["train.learning_rate=-1"])
        assert verdict["problems"] == {"train.learning_rate": [loader.value.problems[0]]}
        assert "greater than 0" in verdict["problems"]["train.learning_rate"][0]
        assert not verdict["ok"]
        assert client.post("/api/train", json=body).status_code == 400  # never started with a bad field

        body["values"] = {"train.save_steps": "3", "train.eval_steps": "2"}  # a section-wide check, on its field
        verdict = client.post("/api/train/check", json=body).json()
        assert "save_steps=3 is not a multiple of eval_steps=2" in verdict["problems"]["train.save_steps"][0]

        body["values"] = {"method.lora_rank": "8", "train.max_steps": "3"}
        verdict = client.post("/api/train/check", json=body).json()
        assert verdict["ok"]
        assert verdict["command"] == ("qatune train 'data.sources=[data/qa.jsonl]' data.output_dir=prepared/r1 "
                                      "train.output_dir=runs/r1 method.lora_rank=8 train.max_steps=3")
        assert load_config(None, verdict["command"].split(" ", 2)[2].replace("'", "").split(" ")).method.lora_rank == 8


def test_check_names_file_line_and_reason(tmp_path, start_studio):
    studio = start_studio(tmp_path / "ws")
    lines = ['{"question": "What is the capital of France?", "answer": "Paris is the capital."}',
             '{"question": "Who wrote Hamlet?", "answer": }',
             '{"question": "How many legs does a spider have?", "answer": "A spider has eight legs."}']
    with httpx.Client(base_url=studio.url) as client:
        client.put("/api/files/data/qa.jsonl", content="\n".join(lines).encode())
        job = client.post("/api/check", json={"path": "data/qa.jsonl"}).json()
        assert job["command"] == "qatune data check data/qa.jsonl --format auto --encoding utf-8"
        deadline = time.time() + 60
        while client.get(f"/api/jobs/{job['id']}").json()["state"] == "running":
            assert time.time() < deadline
            time.sleep(0.2)
        result = client.get(f"/api/jobs/{job['id']}/problems").json()
    assert [(p["file"], p["line"], p["reason"]) for p in result["problems"]] == [("data/qa.jsonl", 2, "malformed")]
    assert result["summary"].startswith("3 records") and "2 usable" in result["summary"]
    assert (studio.workspace / ".studio" / "jobs" / job["id"] / "log.txt").read_text().startswith("data/qa.jsonl, line 2")


def test_one_job_per_output_folder_stop_and_a_restarted_studio(tmp_path):
    space = Workspace(tmp_path / "ws")
    runner = JobRunner(space)
    # `qatune studio` itself is a long-running qatune command: it stands in for a job that writes runs/x.
    args = ["studio", "--workspace", str(space.root / "inner"), "--port", str(free_port())]
    job = runner.start("train", args, "runs/x")
    try:
        with pytest.raises(JobConflict, match="runs/x is being written by job"):
            runner.start("train", args, "runs/x")
        again = JobRunner(space)  # a restarted studio finds the job by its process id
        assert again.get(job.id).state == "running"
        with pytest.raises(JobConflict):
            again.start("train", args, "runs/x")
        time.sleep(1.5)  # let the child install its Ctrl-C handler
        runner.stop(job.id)
        deadline = time.time() + 30
        while runner.get(job.id).state == "running":
            assert time.time() < deadline, "SIGINT did not stop the job"
            time.sleep(0.1)
        assert again.get(job.id).state in ("done", "stopped", "ended")
        assert runner.get(job.id).returncode is not None
        assert runner.start("train", ["--version"], "runs/x").id != job.id  # the folder is free again
    finally:
        if runner.get(job.id).state == "running":
            os.kill(job.pid, 9)


def test_curves_read_the_trainers_event_files(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run" / "runs" / "first"))
    for step, loss in ((1, 3.0), (2, 2.5)):
        writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("eval/loss", 2.9, 2)
    writer.close()
    assert curves(tmp_path / "run") == {"train": [[1, 3.0], [2, 2.5]], "eval": [[2, pytest.approx(2.9)]]}
    time.sleep(0.01)
    resumed = SummaryWriter(str(tmp_path / "run" / "runs" / "second"))  # a resumed run writes a new file
    resumed.add_scalar("train/loss", 2.4, 2)
    resumed.add_scalar("train/loss", 2.0, 3)
    resumed.close()
    assert curves(tmp_path / "run")["train"] == [[1, 3.0], [2, pytest.approx(2.4)], [3, 2.0]]
    assert json.dumps(curves(tmp_path / "missing")) == '{"train": [], "eval": []}'

    # A record still being written (the file cut inside it) is left for the next read.
    event_file = next((tmp_path / "run" / "runs" / "second").iterdir())
    event_file.write_bytes(event_file.read_bytes()[:-5])
    assert curves(tmp_path / "run")["train"] == [[1, 3.0], [2, pytest.approx(2.4)]]


def test_form_check_shows_every_problem_each_its_own_message(tmp_path, start_studio):
    studio = start_studio(tmp_path / "ws")
    body = {"run": "r1", "sources": ["data/qa.jsonl"], "values": {"data.max_length": "-1", "data.max_lenght": "3"}}
    with httpx.Client(base_url=studio.url) as client:
        verdict = client.post("/api/train/check", json=body).json()
        assert client.post("/api/train", json=body).status_code == 400
    with pytest.raises(ConfigError) as loader:
        load_config(None, ["data.max_length=-1"])
    assert verdict["problems"] == {"data.max_length": loader.value.problems}
    assert verdict["other"] == ["data.max_lenght: not a field of the training form"]
    assert not verdict["ok"]


def test_the_commands_the_studio_starts_parse_back_to_their_arguments(recorded_jobs):
    """Every job the studio starts is a command line from the command table that the CLI's own parser
    reads back to the page's arguments."""
    from fastapi.testclient import TestClient

    from qatune.cli import parse_args

    app, started = recorded_jobs
    form = {"run": "r1", "sources": ["data/qa.jsonl"], "values": {"train.max_steps": "3"}}
    model_job = {"base": "models/tiny", "run": "r1"}
    requests = [
        ("/api/check", {"path": "data/qa.jsonl", "dataset": "a,b"},
         {"command": "data", "action": "check", "file": "data/qa.jsonl", "format": "auto", "dataset": "a,b",
          "encoding": "utf-8"}),
        ("/api/prepare", form, {"command": "data", "action": "prepare", "args": [
            "data.sources=[data/qa.jsonl]", "data.output_dir=prepared/r1", "train.output_dir=runs/r1",
            "train.max_steps=3"]}),
        ("/api/train?resume=true", form, {"command": "train", "nproc": 1, "args": [
            "data.sources=[data/qa.jsonl]", "data.output_dir=prepared/r1", "train.output_dir=runs/r1",
            "train.max_steps=3", "train.resume=true"]}),
        ("/api/eval", {**model_job, "data": "data/qa.jsonl", "extra": ["eval.max_samples=2"]},
         {"command": "eval", "compare": ["models/tiny", "runs/r1"], "data": ["data/qa.jsonl"], "out": "runs/r1/eval",
          "model": None, "args": ["eval.max_samples=2"]}),
        ("/api/summarize", {"sheet": "runs/r1/eval/review_sheet.csv"},
         {"command": "eval", "args": ["summarize", "runs/r1/eval/review_sheet.csv"]}),
        ("/api/export", {**model_job, "gguf": "f16", "force": True, "extra": ["export.dtype=float32"]},
         {"command": "export", "model": "models/tiny", "adapter": "runs/r1", "out": "exports/r1", "gguf": "f16",
          "quantize": None, "force": True, "gguf_adapter": False, "args": ["export.dtype=float32"]}),
        ("/api/chat", {**model_job, "extra": ["serve.decoding.max_new_tokens=8"]},
         {"command": "serve", "model": "models/tiny", "adapter": ["r1=runs/r1"], "engine": None,
          "args": ["serve.decoding.max_new_tokens=8"]}),
    ]
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host, as the guard wants
        for path, body, _ in requests:
            assert client.post(path, json=body).status_code == 200, path
    assert len(started) == len(requests)
    for job, (path, _, expected) in zip(started, requests):
        ns = parse_args(job.args)
        assert {k: getattr(ns, k) for k in expected} == expected, path
    assert parse_args(started[-1].args).port == started[-1].port  # the chat server's port

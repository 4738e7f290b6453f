"""A real `qatune studio` on 127.0.0.1 in a background thread, over a fresh workspace folder."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qatune.studio.app import create_app
from qatune.studio.paths import Workspace
from tests.serve.conftest import free_port


@dataclass
class RunningStudio:
    url: str
    workspace: Path
    app: Any


@pytest.fixture
def start_studio() -> Iterator:
    """start_studio(workspace, token=None, max_upload_bytes=...) -> RunningStudio; each stops after the test."""
    import uvicorn

    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(workspace: Path, **options) -> RunningStudio:
        port = free_port()
        app = create_app(Workspace(workspace), **options)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the studio did not start"
            time.sleep(0.05)
        running.append((server, thread))
        return RunningStudio(f"http://127.0.0.1:{port}", Path(workspace).resolve(), app)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def recorded_jobs(tmp_path) -> tuple[Any, list]:
    """A studio app whose runner records each job's command line instead of starting it: (app, jobs started)."""
    from qatune.studio.jobs import Job, JobRunner

    started: list[Job] = []

    class Recorder(JobRunner):
        def start(self, kind, args, output=None, port=None, env=None):
            started.append(Job(f"job{len(started)}", kind, list(args), output, port=port))
            return started[-1]

    space = Workspace(tmp_path / "ws")
    app = create_app(space)
    app.state.studio.runner = Recorder(space)
    return app, started

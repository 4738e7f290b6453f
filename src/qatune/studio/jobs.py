"""Jobs: `qatune` commands run as subprocesses in the workspace, recorded on disk.

Each job is a folder `.studio/jobs/<id>/` with `job.json` (the command, the folder it writes, its
process id and state) and `log.txt` (everything it printed). The studio runs the same CLI a user
types, so what the browser did can be repeated from a script: the command is shown with every job.
Jobs start in their own session and outlive the studio (a closed tab or a restarted studio
finds them again by their process id); a job that ended while no studio watched it is `ended`,
and for a training run the folder itself tells whether it completed or stopped
(`qatune.studio.progress.run_state`). One output folder takes one job at a time.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qatune import files as atomic
from qatune.errors import QatuneError
from qatune.studio.paths import Workspace

# Exit codes of the CLI: 130 is Ctrl-C / SIGINT after a checkpoint was saved.
STATE_OF_EXIT = {0: "done", 130: "stopped"}


class JobConflict(QatuneError):
    """A second job for a folder that a running job writes."""


class NotFound(QatuneError):
    """A job, run, report or file the workspace does not hold."""


@dataclass
class Job:
    id: str
    kind: str  # check, prepare, train, eval, summarize, export, serve
    args: list[str]  # the qatune arguments, as typed after `qatune`
    output: str | None  # the workspace-relative folder (or file) it writes; one job at a time there
    pid: int | None = None
    state: str = "running"  # running, done, stopped, failed, ended (finished unwatched)
    returncode: int | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    port: int | None = None  # a serve job's port

    @property
    def command(self) -> str:
        return "qatune " + shlex.join(self.args)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "command": self.command}


class JobRunner:
    """Starts, lists, stops and reads the jobs of one workspace."""

    def __init__(self, workspace: Workspace, program: tuple[str, ...] = (sys.executable, "-m", "qatune")) -> None:
        self.workspace = workspace
        self.program = program  # what runs a job's arguments; the fuzz tests stand a cheap process in for it
        self.folder = workspace.studio_dir / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen] = {}

    def start(self, kind: str, args: list[str], output: str | None = None, port: int | None = None,
              env: dict[str, str] | None = None) -> Job:
        with self._lock:
            if output is not None:
                busy = next((j for j in self.jobs() if j.state == "running" and j.output == output), None)
                if busy:
                    raise JobConflict(f"{output} is being written by job {busy.id} ({busy.command})",
                                      hint="wait for it to end, or stop it first")
            job = Job(uuid.uuid4().hex[:12], kind, list(args), output, port=port)
            folder = self.folder / job.id
            folder.mkdir()
            with open(folder / "log.txt", "wb") as log:
                child = subprocess.Popen(
                    [*self.program, *args], cwd=self.workspace.root, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    # rich wraps tables at the terminal width: a wide, fixed one keeps log lines whole
                    env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", **(env or {})})
            job.pid = child.pid
            self._children[job.id] = child
            self._save(job)
        threading.Thread(target=self._watch, args=(job, child), daemon=True).start()
        return job

    def _watch(self, job: Job, child: subprocess.Popen) -> None:
        returncode = child.wait()
        with self._lock:
            job.returncode, job.ended = returncode, time.time()
            job.state = STATE_OF_EXIT.get(returncode, "failed")
            self._save(job)
            self._children.pop(job.id, None)

    def _save(self, job: Job) -> None:
        atomic.write_text(self.folder / job.id / "job.json", json.dumps(asdict(job)))

    def get(self, job_id: str) -> Job:
        path = self.folder / job_id / "job.json"
        if not job_id.isalnum() or not path.is_file():
            raise NotFound(f"no job {job_id!r} in this workspace")
        job = Job(**json.loads(path.read_text(encoding="utf-8")))
        if job.state == "running" and job.id not in self._children and not _alive(job.pid):
            job.state, job.ended = "ended", job.ended or time.time()  # it ended while no studio watched it
        return job

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        found = []
        for path in self.folder.glob("*/job.json"):
            try:
                found.append(self.get(path.parent.name))
            except (NotFound, ValueError, TypeError):
                continue  # a record being written, or not the studio's
        return sorted(found, key=lambda j: j.started, reverse=True)

    def latest(self, output: str, kinds: tuple[str, ...]) -> Job | None:
        return next((j for j in self.jobs() if j.output == output and j.kind in kinds), None)

    def stop(self, job_id: str) -> Job:
        """SIGINT, as Ctrl-C: `qatune train` finishes its step, saves a checkpoint and exits with 130."""
        job = self.get(job_id)
        if job.state == "running" and job.pid:
            try:
                os.kill(job.pid, signal.SIGINT)
            except ProcessLookupError:  # it ended between the read of its record and the signal
                return self.get(job_id)
        return job

    def log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The log from byte `offset`, and the offset to read on from."""
        path = self.folder / self.get(job_id).id / "log.txt"
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def stop_all(self, kind: str) -> None:
        """Stop this studio's own running jobs of one kind (the chat servers when the studio exits)."""
        for job_id, child in list(self._children.items()):
            if self.get(job_id).kind == kind:
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()


def _alive(pid: int | None) -> bool:
    """Whether `pid` is still a running qatune command (not a reused process id)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): the process id alone
        except OSError:
            return False
        return True
    if b"qatune" not in cmdline:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended

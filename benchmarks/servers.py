"""What the serve benchmarks share: a free loopback port, and a server process started and waited for."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """A server exited or did not answer in time; the message holds the end of its log."""


def start_server(command: list[str], port: int, name: str, ready: str = "/health", timeout: float = 300,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Run `command` (a server on 127.0.0.1:`port`) and wait until `ready` answers 200 (5 minutes at most)."""
    # A file, not a pipe: a server that logs a lot (llama_cpp.server) would block once a pipe's buffer is full.
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                               env=None if env is None else os.environ | env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise ServerFailed(f"{name} server exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url + ready, timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    raise ServerFailed(f"{name} server did not start within {timeout:.0f} s")

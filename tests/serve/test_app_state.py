"""No state crosses apps: two apps made in one process each have their own Service (engine, metrics,
admissions) and their own throttle of unexpected-error tracebacks, and each engine loop throttles its own
failed steps. No model is loaded: the engines here fail on purpose."""

from __future__ import annotations

import logging
import threading

from fastapi.testclient import TestClient

from qatune.config import load_config
from qatune.serve.app import create_app
from qatune.serve.protocol import Sampling, ServedModel
from qatune.serve.scheduling import BatchLoop, Request


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [1] * len(text)


class BrokenEngine:
    """The Engine protocol around an engine whose every generation fails with a bug of its own."""

    kind, default_model, max_positions, queue_depth, in_flight, alive = "broken", "m", None, 0, 0, True

    def __init__(self) -> None:
        self.models = {"m": ServedModel("m", None, None, (0,))}  # type: ignore[arg-type]  # no template: no chat here
        self.tokenizer = Tokenizer()

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def generate(self, prompt_ids: list[int], sampling: Sampling, model: str) -> None:
        raise RuntimeError("an engine bug")


class FailingLoop(BatchLoop):
    """An engine loop whose every step fails."""

    tokenizer = None

    def _step(self, admitted: list[Request]) -> int | None:
        raise RuntimeError("a step bug")

    def _reset(self) -> None:
        self._running = []


def test_two_apps_share_no_state(caplog):
    cfg = load_config(None, ["serve.abuse_refusals=0"]).serve
    apps = [create_app(BrokenEngine(), cfg) for _ in range(2)]
    first, second = (app.state.service for app in apps)
    assert first is not second
    assert first.unexpected is not second.unexpected and first.metrics is not second.metrics
    assert first.admission is not second.admission
    with caplog.at_level(logging.ERROR, logger="qatune.serve"):
        for app in apps:
            with TestClient(app, base_url="http://127.0.0.1") as client:
                for _ in range(3):
                    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 500
    # One traceback per app: the first app's did not silence the second's, nor the second's first.
    assert len([r for r in caplog.records if r.exc_info]) == 2
    for service in (first, second):
        assert service.unexpected.suppressed == 2
        assert service.metrics.registry.get_sample_value(
            "qatune_requests_total", {"route": "/v1/completions", "status": "500"}) == 3


def test_each_engine_loop_throttles_its_own_failed_steps(caplog):
    loops = [FailingLoop(max_batch_size=1, max_queue=4, on_step=None) for _ in range(2)]
    assert loops[0].step_failures is not loops[1].step_failures
    with caplog.at_level(logging.ERROR, logger="qatune.serve"):
        for loop in loops:
            loop.start()
            for _ in range(2):
                finished = threading.Event()
                loop.submit(Request([1], Sampling(1), (), lambda update: update.finish_reason and finished.set()))
                assert finished.wait(10)
            loop.stop()
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["generation step failed"] * 2

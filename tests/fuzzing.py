"""What the fuzz tests of every HTTP surface (`qatune serve` on each engine, `qatune studio`) share: schemathesis
cases from the server's own OpenAPI schema, a liveness probe timed throughout, the server's log captured, and
the process's memory before and after. `fuzz_surface` asserts the issue-37 contract and prints one summary line
per surface (run pytest with -s to read it): cases per route, the status codes seen, /health p99, memory."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import psutil
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LOGGERS = ("qatune", "uvicorn", "uvicorn.error")  # uvicorn's records do not reach the root logger
MEMORY_SLACK_MB = 200


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of qatune's and uvicorn's loggers while the block runs."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.exc_info or r.levelno >= logging.ERROR]


class HealthProbe:
    """Times GET `path` every 20 ms in a thread, as a liveness probe would, while something else happens."""

    def __init__(self, url: str, path: str = "/health", headers: dict[str, str] | None = None) -> None:
        self.url, self.path, self.headers = url, path, headers or {}
        self.times: list[float] = []
        self.failures: list[str] = []  # asserted by the test: an assert in this thread would go unseen
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10, headers=self.headers) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                status = client.get(self.url + self.path).status_code
                self.times.append(time.perf_counter() - started)
                if status != 200:
                    self.failures.append(f"{self.path}: {status}")
                time.sleep(0.02)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def __enter__(self) -> "HealthProbe":
        self.thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)
        self.stop.set()
        self.thread.join()


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@dataclass
class Tally:
    routes: Counter = field(default_factory=Counter)  # cases per "METHOD path"
    statuses: Counter = field(default_factory=Counter)

    @property
    def cases(self) -> int:
        return sum(self.routes.values())


def operations(schema) -> set[str]:
    return {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}


def fuzz_schema(schema, url: str, headers: dict[str, str], cases: int,
                refusal_ok: Callable[[requests.Response], bool], tally: Tally | None = None) -> Tally:
    """Send `cases` schemathesis cases, valid and invalid, over every operation of `schema`; fails on the first
    5xx, traceback in an answer, or refusal not in the surface's error format."""
    from schemathesis import GenerationMode

    tally = tally or Tally()
    session = requests.Session()

    @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)))
    def one(case) -> None:
        response = case.call(base_url=url, session=session, headers=headers, timeout=30)
        tally.routes[f"{case.method.upper()} {case.operation.path}"] += 1
        tally.statuses[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:300])
        assert "Traceback" not in response.text
        if response.status_code >= 400:
            assert refusal_ok(response), response.text[:300]

    one()
    return tally


def warm_up(schema, url: str, headers: dict[str, str], refusal_ok: Callable[[requests.Response], bool]) -> Tally:
    """A few cases of each operation: every route is reached at least once (a random mix can miss a route without
    parameters), and what a route imports on its first call is loaded before memory is measured."""
    tally = Tally()
    for operation in schema.get_all_operations():
        path = operation.ok().path
        fuzz_schema(schema.include(path=path, method=operation.ok().method), url, headers, 3, refusal_ok, tally)
    return tally


def fuzz_surface(surface: str, schema, url: str, cases: int, refusal_ok: Callable[[requests.Response], bool],
                 headers: dict[str, str] | None = None, probe: str = "/health",
                 settle: Callable[[], None] = lambda: None) -> Tally:
    """`warm_up`, then `fuzz_schema` while a probe times `probe`, with the issue's checks: no traceback in the log, the probe's
    p99 under 100 ms, every operation reached, memory back within MEMORY_SLACK_MB after `settle`."""
    headers = headers or {}
    with captured_logs() as log:
        tally = warm_up(schema, url, headers, refusal_ok)
        baseline = rss_mb()
        with HealthProbe(url, probe, headers) as health:
            fuzz_schema(schema, url, headers, cases, refusal_ok, tally)
    settle()
    after = rss_mb()
    p99, worst = health.quantile(0.99) * 1000, max(health.times) * 1000
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(tally.statuses.items()))
    print(f"\nfuzz {surface}: {tally.cases} cases over {len(tally.routes)} operations ({dict(tally.routes)}); "
          f"statuses {{{codes}}}; {probe} p99 {p99:.1f} ms, max {worst:.1f} ms over {len(health.times)} probes; "
          f"rss {baseline:.0f} MB -> {after:.0f} MB", flush=True)
    assert tally.cases >= cases * 0.9, tally.routes
    assert set(tally.routes) == operations(schema), operations(schema) - set(tally.routes)
    assert not tracebacks(log), tracebacks(log)[:3]
    assert not health.failures, health.failures[:5]
    assert p99 < 100, f"{probe} p99 {p99:.0f} ms during the fuzzing"
    assert after - baseline < MEMORY_SLACK_MB, f"memory grew from {baseline:.0f} MB to {after:.0f} MB"
    return tally

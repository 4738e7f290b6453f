"""Process-wide state: environment variables, signal handlers, library loggers."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def environment_defaults(values: Mapping[str, str]) -> Iterator[None]:
    """Set each variable the environment does not already set (the user's own settings win);
    removed again afterwards."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextmanager
def signal_handlers(handler: Callable[[int, Any], None],
                    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """`handler` for these signals inside the block, the previous handlers after. Off the main
    thread (a studio job, a test runner's worker) signals cannot be caught, and nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def logger_levels(levels: Mapping[str, int]) -> Iterator[None]:
    """Named loggers at these levels inside the block, as they were afterwards."""
    loggers = {name: logging.getLogger(name) for name in levels}
    before = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(levels[name])
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(before[name])


@contextmanager
def switched_off(is_on: Callable[[], bool], off: Callable[[], None], on: Callable[[], None]) -> Iterator[None]:
    """A library's global on/off switch off inside the block, and back on after if it was on."""
    was_on = is_on()
    off()
    try:
        yield
    finally:
        if was_on:
            on()

"""datasets: its global progress-bar switch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def progress_bars_off() -> Iterator[None]:
    """No "Saving the dataset" bars inside the block (the data stage prints its own summary); as before after."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()

"""datasets: its global progress-bar switch."""

from __future__ import annotations

from contextlib import AbstractContextManager

from qatune.compat.process import switched_off


def progress_bars_off() -> AbstractContextManager[None]:
    """No "Saving the dataset" bars inside the block (the data stage prints its own summary); as before after."""
    import datasets

    return switched_off(datasets.is_progress_bar_enabled, datasets.disable_progress_bars,
                        datasets.enable_progress_bars)

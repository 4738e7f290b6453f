"""The export stage's entry point, `export(config, runtime) -> ExportResult`, and its printed summary.

The work is the recipe in recipe.py (plan -> setup -> run); the CLI, the tests and the studio call
`export`, which runs all three.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qatune.config import QatuneConfig
from qatune.export import recipe
from qatune.export.recipe import ExportError, ExportResult
from qatune.export.report import ExportReport, check_lines, perplexity_lines
from qatune.recipe import execute
from qatune.runtime import Runtime

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["ExportError", "ExportResult", "export", "print_summary"]


def export(config: QatuneConfig, runtime: Runtime | None = None) -> ExportResult:
    """Merge `export.adapter` (if any) into `model`, write the Hugging Face folder, GGUF and quantized copies."""
    return execute(recipe, recipe.plan(config, runtime or Runtime.detect()))


def print_summary(report: ExportReport, console: "Console") -> None:
    from rich.table import Table

    table = Table(title="Exported files", title_justify="left")
    table.add_column("file")
    table.add_column("MiB", justify="right")
    for name, size in report.files.items():
        table.add_row(name, f"{size:,.1f}")
    console.print(table)
    for line in check_lines(report) + perplexity_lines(report):
        console.print(line, markup=False, highlight=False)

"""Writing a file so that it is either the old one or the whole new one, never half of either.

Also here: `model_folders`, the folders no output may ever replace (a stage's plan refuses an
output that is, or holds, one of them).

Every file qatune writes itself goes through `atomic_path`: the writer fills a temporary file beside
the target (same folder, so the same file system), which is flushed to disk and renamed over the
target only when the writer returned. A writer that raises, or a process killed mid-write, leaves the
target as it was and no temporary file behind (a kill leaves at most a hidden `.NAME.tmp-PID.EXT`,
which no reader looks for). The temporary name keeps the target's extension: matplotlib and others
choose the format from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qatune.config import ModelConfig


def temporary_name(path: Path) -> Path:
    """Where `path`'s new content is written first: hidden, beside it, with its extension."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed over `path` when the block ends
    without an error, deleted when it raises."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(target)
    try:
        yield temporary
        with open(temporary, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """`path.write_text(text)`, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as indented UTF-8 JSON, atomically."""
    return write_text(path, json.dumps(value, ensure_ascii=False, indent=2))


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """One JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------
# Folders no output may replace


def model_folders(model: ModelConfig, adapters: tuple[str | Path | None, ...] = ()) -> list[Path]:
    """The local folders a stage reads weights from, resolved: the model's (a GGUF file's folder too),
    each adapter's, and the base each adapter's adapter_config.json names. No output may replace them."""
    from qatune.models import locate_model, read_adapter

    location = locate_model(model)
    found = [Path(location.path)] if location.is_local else []
    found += [Path(a) for a in adapters if a]
    for folder in list(found):
        adapter = read_adapter(folder) if folder.is_dir() else None
        if adapter is not None and adapter.base and Path(adapter.base).expanduser().is_dir():
            found.append(Path(adapter.base).expanduser())
    return [p.resolve() for p in found]


def overlapping(output: Path, folders: list[Path], or_inside: bool = False) -> Path | None:
    """The first of `folders` that is `output` (or, with `or_inside`, lies inside it); None if none does."""
    out = output.expanduser().resolve()
    for folder in folders:
        if folder == out or (or_inside and out in folder.parents):
            return folder
    return None

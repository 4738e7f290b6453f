"""Shared fixtures: the repository root, ../shared/data, the default model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (CI always has ../shared beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded default model's tokenizer (converted from GGUF once, then cached)."""
    from qatune.config import ModelConfig
    from qatune.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path

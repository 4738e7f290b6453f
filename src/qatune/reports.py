"""The JSON reports the stages leave (train_report.json, eval_report.json, export_report.json): each is
a dataclass, written by `write_report` and read back by `read_report`.

A file holds `schema_version` and one key per field, with three exceptions marked on the field:
- `flattened(Group)`: a dataclass (or None) whose own fields stand at the top level of the file, all
  of them or, while it is None, none;
- `gathered()`: a dict whose keys stand at the top level; on reading, it gathers every key of the file
  that is no field (what a plug-in added);
- `omitted_when_none()`: left out of the file while it is None.

Reading tolerates the files older qatune versions wrote: without `schema_version`, and without the
fields they did not have yet (those take their defaults).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from qatune.files import write_json

SCHEMA_VERSION = 1  # raise it when a field changes meaning or a reader could no longer take older files
SCHEMA_KEY = "schema_version"

_FLATTENED = "qatune.flattened"  # the metadata key holding the group's dataclass
_GATHERED = "qatune.gathered"
_OMITTED_WHEN_NONE = "qatune.omitted_when_none"

ReportT = TypeVar("ReportT")


def flattened(group: type) -> Any:
    """A field holding a `group` dataclass or None, whose fields are top-level keys of the file."""
    return dataclasses.field(default=None, metadata={_FLATTENED: group})


def gathered() -> Any:
    """A dict field whose keys are top-level keys of the file; reading gathers the keys that are no field."""
    return dataclasses.field(default_factory=dict, metadata={_GATHERED: True})


def omitted_when_none() -> Any:
    """A field that is None by default and then absent from the file."""
    return dataclasses.field(default=None, metadata={_OMITTED_WHEN_NONE: True})


def report_json(report: Any) -> dict[str, Any]:
    """The report as the JSON object its file holds."""
    out: dict[str, Any] = {SCHEMA_KEY: SCHEMA_VERSION}
    for f in dataclasses.fields(report):
        value = getattr(report, f.name)
        if f.metadata.get(_GATHERED):
            out.update(value)
        elif f.metadata.get(_FLATTENED):
            out.update(dataclasses.asdict(value) if value is not None else {})
        elif value is not None or not f.metadata.get(_OMITTED_WHEN_NONE):
            out[f.name] = value
    return out


def report_from_json(cls: type[ReportT], data: dict[str, Any]) -> ReportT:
    """The `cls` report a JSON object holds (one an older qatune wrote included)."""
    values: dict[str, Any] = {}
    taken = {SCHEMA_KEY}
    gather_into = None
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        group = f.metadata.get(_FLATTENED)
        if f.metadata.get(_GATHERED):
            gather_into = f.name
        elif group is not None:
            names = [g.name for g in dataclasses.fields(group)]
            taken.update(names)
            if any(name in data for name in names):
                values[f.name] = group(**{name: data[name] for name in names if name in data})
        elif f.name in data:
            values[f.name] = data[f.name]
        taken.add(f.name)
    if gather_into is not None:
        values[gather_into] = {key: value for key, value in data.items() if key not in taken}
    return cls(**values)


def write_report(report: Any, path: Path) -> None:
    """The report's JSON file (written to a temporary name, then renamed)."""
    write_json(path, report_json(report))


def read_report(cls: type[ReportT], path: Path) -> ReportT:
    return report_from_json(cls, json.loads(Path(path).read_text(encoding="utf-8")))

"""Reading and cleaning: every source's records -> normalised, filtered, deduplicated conversations.

`load(data)` is the part of the data stage that reads files; `check(...)` runs it alone and lists
every problem without writing anything (`qatune data check`). Model-written data (`qatune.synth`)
reads the existing data through `load` too, so it deduplicates against what `prepare` would keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from qatune.config import DataConfig, SourceConfig
from qatune.data import clean
from qatune.data.formats import check_columns, detect_format, to_conversation
from qatune.data.readers import RawRecord, data_files, read_records
from qatune.data.records import MALFORMED, Conversation, DropLog
from qatune.data.registry import resolve_registry
from qatune.errors import DataError, Location

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


@dataclass
class SourceStats:
    name: str
    role: str  # domain, general or eval
    files: list[str] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)
    read: int = 0


@dataclass
class LoadedData:
    """Cleaned conversations by role, with the drops and per-source read counts."""

    domain: list[Conversation]
    general: list[Conversation]
    evaluation: list[Conversation]
    log: DropLog
    sources: list[SourceStats]


def expand_sources(sources: list[SourceConfig]) -> list[SourceConfig]:
    """Registry entries (`dataset:`) become plain file sources."""
    out: list[SourceConfig] = []
    for source in sources:
        out += resolve_registry(source) if source.dataset else [source]
    return out


def source_files(sources: list[SourceConfig]) -> list[tuple[SourceConfig, list[Path]]]:
    """Each source (registry entries expanded) with the files it reads; a missing one raises here, before
    anything is loaded."""
    return [(source, data_files(source.path, plain_text=source.format == "text"))
            for source in expand_sources(sources)]


def source_name(source: SourceConfig, taken: set[str]) -> str:
    """The report's label: `name`, else folder/file (`zh_medical_qa/train`), made unique."""
    path = Path(source.path)
    name = source.name or (f"{path.parent.name}/{path.stem}" if path.suffix else path.name) or source.path
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}#{n}", n + 1
    taken.add(unique)
    return unique


def read_source(source: SourceConfig, data: DataConfig, log: DropLog, stats: SourceStats) -> Iterator[Conversation]:
    """Stream one source's conversations, normalised and filtered; bad records raise or are counted."""
    for path in data_files(source.path, plain_text=source.format == "text"):
        stats.files.append(str(path))
        fmt = None
        for raw in islice(read_records(path, data.encoding, data.max_record_bytes), source.max_records):
            stats.read += 1
            if fmt is None and raw.data is not None:
                # Decided once per file from its first readable record; a file whose shape fits no
                # format (or a table missing a column) fails as a whole: skipping would drop it all.
                fmt = detect_format(raw.data, source, raw.location)
                if path.suffix.lower() in TABLE_SUFFIXES:
                    check_columns(list(raw.data), fmt, source, Location(str(path)))
                stats.formats.add(fmt)
            conv = _convert(raw, fmt, source, stats.name, data, log)
            if conv is None:
                continue
            clean.normalize(conv, data.clean.unicode_form)
            rejected = clean.rejection(conv, data.clean)
            if rejected:
                log.add(rejected[0], stats.name, conv.location, rejected[1])
                continue
            yield conv


def _convert(raw: RawRecord, fmt: str | None, source: SourceConfig, name: str, data: DataConfig,
             log: DropLog) -> Conversation | None:
    """One raw record to a Conversation; a bad record raises (on_error=raise) or is counted."""
    error = raw.error
    if error is None:
        try:
            return to_conversation(fmt, raw.data, source, name, raw.location)
        except DataError as exc:
            error = exc
    if data.on_error == "raise":
        if not error.hint:
            error.hint = "fix the record, or set data.on_error=skip to drop and count bad records"
        raise error
    log.add(MALFORMED, name, raw.location, error.message)
    return None


def load(data: DataConfig, log: DropLog | None = None) -> LoadedData:
    """Read every source, normalise, filter, and drop exact and near duplicates (counted in `log`)."""
    log = log if log is not None else DropLog()
    stats: list[SourceStats] = []
    names: set[str] = set()
    by_role: dict[str, list[Conversation]] = {}
    for role, sources in (("domain", data.sources), ("general", data.general_sources), ("eval", data.eval_sources)):
        convs: list[Conversation] = []
        for source in expand_sources(sources):
            stat = SourceStats(source_name(source, names), role)
            stats.append(stat)
            convs += read_source(source, data, log, stat)
        by_role[role] = convs
    if data.clean.dedup:
        seen: dict[str, str] = {}  # domain and general share one index: a record in both is kept once
        by_role["domain"] = clean.drop_exact_duplicates(by_role["domain"], log, seen)
        by_role["general"] = clean.drop_exact_duplicates(by_role["general"], log, seen)
        by_role["eval"] = clean.drop_exact_duplicates(by_role["eval"], log)
    if data.clean.near_dedup:
        kept = clean.drop_near_duplicates(by_role["domain"] + by_role["general"], data.clean, log)
        by_role["domain"], by_role["general"] = partition(kept, by_role["domain"])
    return LoadedData(by_role["domain"], by_role["general"], by_role["eval"], log, stats)


def load_domain(data: DataConfig, sources: list[SourceConfig] | None = None) -> LoadedData:
    """Only the domain sources (`sources`, default data.sources), read and cleaned as `prepare` reads them."""
    update = {"general_sources": [], "eval_sources": [], "mix_ratio": None}
    return load(data.model_copy(update=update if sources is None else {**update, "sources": sources}))


def partition(kept: list[Conversation], group: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """Split what a filter kept of `group + others` back into (group, others), order preserved."""
    ids = {id(c) for c in group}
    return [c for c in kept if id(c) in ids], [c for c in kept if id(c) not in ids]


@dataclass
class CheckResult:
    records: int
    kept: int
    formats: dict[str, list[str]]
    log: DropLog

    @property
    def errors(self) -> int:
        return sum(1 for d in self.log.drops if d.reason == MALFORMED)


def check(sources: list[SourceConfig], data: DataConfig) -> CheckResult:
    """Read and clean without writing: every bad record and every would-be drop, with its location."""
    loaded = load_domain(data.model_copy(update={"on_error": "skip"}), sources)
    return CheckResult(
        records=sum(s.read for s in loaded.sources),
        kept=len(loaded.domain),
        formats={s.name: sorted(s.formats) for s in loaded.sources},
        log=loaded.log,
    )

"""The data stage: read -> convert -> clean -> split -> mix -> tokenize -> write, with its report.

`prepare(config)` is the entry point the CLI and the train stage both call; `check(...)` runs the
reading and cleaning part alone and lists every problem without writing anything.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import __version__
from qatune.config import DataConfig, QatuneConfig, SourceConfig
from qatune.data import clean
from qatune.data.formats import check_columns, detect_format, to_conversation
from qatune.data.readers import RawRecord, data_files, read_records
from qatune.data.records import CONTROL_TOKEN, MALFORMED, TOO_LONG, Conversation, DropLog
from qatune.data.registry import resolve_registry
from qatune.errors import DataError, Location

if TYPE_CHECKING:
    from datasets import Dataset

DATASET_DIR = "dataset"
REPORT_FILE = "data_report.json"
DROPS_FILE = "dropped.jsonl"
HISTOGRAM_FILE = "token_lengths.png"
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "config.yaml"
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


@dataclass
class PreparedData:
    """What `prepare` produced: the tokenized splits, the report, and where they were written."""

    output_dir: Path
    train: "Dataset"
    validation: "Dataset | None"
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading and cleaning


def expand_sources(sources: list[SourceConfig]) -> list[SourceConfig]:
    """Registry entries (`dataset:`) become plain file sources."""
    out: list[SourceConfig] = []
    for source in sources:
        out += resolve_registry(source) if source.dataset else [source]
    return out


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
        for taken, raw in enumerate(read_records(path, data.encoding)):
            if source.max_records is not None and taken >= source.max_records:
                break
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
        by_role["domain"], by_role["general"] = _partition(kept, by_role["domain"])
    return LoadedData(by_role["domain"], by_role["general"], by_role["eval"], log, stats)


def _partition(kept: list[Conversation], group: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """Split what a filter kept of `group + others` back into (group, others), order preserved."""
    ids = {id(c) for c in group}
    return [c for c in kept if id(c) in ids], [c for c in kept if id(c) not in ids]


# ---------------------------------------------------------------------------------------------
# Split, leakage, mixing


def split(domain: list[Conversation], evaluation: list[Conversation], data: DataConfig,
          rng: random.Random) -> tuple[list[Conversation], list[Conversation]]:
    """Explicit eval sources win; otherwise a seeded `val_size` share (or count) of the domain data."""
    if evaluation or data.val_size == 0 or len(domain) < 2:
        return list(domain), list(evaluation)
    order = list(range(len(domain)))
    rng.shuffle(order)
    n_val = int(data.val_size) if data.val_size >= 1 else round(len(domain) * data.val_size)
    n_val = min(max(n_val, 1), len(domain) - 1)
    val_ids = set(order[:n_val])
    return ([c for i, c in enumerate(domain) if i not in val_ids], [c for i, c in enumerate(domain) if i in val_ids])


def mix(train: list[Conversation], general: list[Conversation], data: DataConfig,
        rng: random.Random) -> tuple[list[Conversation], dict[str, Any]]:
    """Add general records so that they make up `mix_ratio`'s share of train (all if there are too few)."""
    share = data.general_share()
    if not general or share == 0:
        return train, {}
    wanted = round(len(train) * share / (1 - share))
    used = rng.sample(general, min(wanted, len(general)))
    info = {
        "ratio": data.mix_ratio, "general_available": len(general), "general_wanted": wanted,
        "general_used": len(used), "general_share": round(len(used) / max(1, len(train) + len(used)), 4),
    }
    if len(used) < wanted:
        info["warning"] = f"only {len(general)} general records for the {wanted} that {data.mix_ratio} asks"
    return train + used, info


def decorate(convs: list[Conversation], data: DataConfig, tag: bool) -> None:
    """Default system prompt for records without one; task tag on the first user turn of domain data."""
    for conv in convs:
        if conv.is_text:
            continue
        if data.system and conv.messages[0]["role"] != "system":
            conv.messages.insert(0, {"role": "system", "content": data.system})
        if tag and data.task_tag:
            first_user = next(m for m in conv.messages if m["role"] == "user")
            first_user["content"] = f"{data.task_tag} {first_user['content']}"


# ---------------------------------------------------------------------------------------------
# The stage


def prepare(config: QatuneConfig, write: bool = True) -> PreparedData:
    """Run the whole data stage and (by default) write dataset, report, drops, histogram."""
    from qatune.data import report as data_report
    from qatune.data.templates import stage_template, template_metadata
    from qatune.models import load_tokenizer

    data = config.data
    if not data.sources:
        raise DataError("data.sources is empty", hint="add at least one dataset: data.sources=[path/to/file.jsonl]")
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)  # first: a wrong model should fail before minutes of cleaning
    stage = config.train.stage
    template = stage_template(tokenizer, data.template, stage)
    rng = random.Random(data.seed)

    loaded = load(data)
    train, validation = split(loaded.domain, loaded.evaluation, data, rng)
    general = loaded.general
    if data.clean.leakage:
        kept = clean.drop_eval_leakage(train + general, validation, data.clean, loaded.log)
        train, general = _partition(kept, train)
    decorate(train + validation, data, tag=True)
    decorate(general, data, tag=False)
    train, mix_info = mix(train, general, data, rng)

    if stage == "pt":
        _check_plain_text(train + validation)
        splits = {"train": _packed(train, tokenizer, data.max_length)}
        if validation:
            splits["validation"] = _packed(validation, tokenizer, data.max_length)
    else:
        splits = {"train": _tokenized(train, tokenizer, template, data, loaded.log)}
        if validation:
            splits["validation"] = _tokenized(validation, tokenizer, template, data, loaded.log)
    elapsed = time.perf_counter() - started

    report = data_report.build_report(
        config=config, tokenizer=tokenizer, template=template_metadata(template), loaded=loaded,
        splits=splits, mix_info=mix_info, elapsed=elapsed, version=__version__,
    )
    report["fingerprint"] = fingerprint(config)
    validation_rows = splits.get("validation")
    prepared = PreparedData(Path(data.output_dir), _to_dataset(splits["train"]),
                            _to_dataset(validation_rows) if validation_rows else None, report)
    if write:
        _write(prepared, config, template.source, loaded.log, splits)
    if not splits["train"]:
        where = f"; every drop is listed in {prepared.output_dir / DROPS_FILE}" if write else ""
        drops = ", ".join(f"{n} {reason}" for reason, n in loaded.log.by_reason().items()) or "none"
        raise DataError(f"no training sample left: {report['records_read']} records read, dropped: {drops}{where}",
                        hint="look at the drop reasons above; loosen data.clean thresholds or fix the data")
    return prepared


def _tokenized(convs: list[Conversation], tokenizer: Any, template: Any, data: DataConfig,
               log: DropLog) -> list[dict[str, Any]]:
    from qatune.data.templates import control_token_in, control_tokens, tokenize

    pattern = control_tokens(tokenizer)
    usable = []
    for conv in convs:
        problem = control_token_in(conv, pattern)
        if problem:
            log.add(CONTROL_TOKEN, conv.source, conv.location, problem)
        else:
            usable.append(conv)
    rows = []
    for conv, samples in tokenize(usable, tokenizer, template, data.max_length, data.train_on_prompt):
        if not samples:
            log.add(TOO_LONG, conv.source, conv.location,
                    f"prompt leaves less than a quarter of max_length={data.max_length} for the answer")
            continue
        for sample in samples:
            rows.append({
                "input_ids": sample.input_ids, "labels": sample.labels, "length": len(sample.input_ids),
                "truncated": sample.truncated, "source": conv.source, "location": str(conv.location),
                "messages": conv.messages,
                "tools": json.dumps(conv.tools, ensure_ascii=False) if conv.tools else "",
            })
    return rows


def _check_plain_text(convs: list[Conversation]) -> None:
    """Continued pre-training reads documents, not conversations: a Q&A record there is a mistake."""
    for conv in convs:
        if not conv.is_text:
            raise DataError("train.stage=pt trains on plain text, and this record is a conversation", conv.location,
                            hint="give pt sources of format text ({\"text\": ...} records, .txt or .md files), "
                                 "or set train.stage=sft")


def _packed(convs: list[Conversation], tokenizer: Any, max_length: int, batch: int = 256) -> list[dict[str, Any]]:
    """Continued pre-training samples, as LLaMA-Factory's pt stage makes them: every document followed by
    eos, all joined into one token stream and cut into blocks of max_length, labels on every token. No
    padding is wasted on short documents; only the last block may be shorter. A block records the
    document it starts in (`source`, `location`) and every document it covers (`covers`, for the report)."""
    import bisect

    stream: list[int] = []
    starts: list[int] = []  # where each document begins in the stream
    for first in range(0, len(convs), batch):
        texts = [conv.messages[0]["content"] for conv in convs[first:first + batch]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            starts.append(len(stream))
            stream += ids + [tokenizer.eos_token_id]
    rows = []
    for begin in range(0, len(stream), max_length):
        block = stream[begin:begin + max_length]
        if len(block) < 2:  # a lone final eos has nothing to predict
            continue
        first_doc = bisect.bisect_right(starts, begin) - 1
        last_doc = bisect.bisect_right(starts, begin + len(block) - 1) - 1
        conv = convs[first_doc]
        rows.append({
            "input_ids": block, "labels": list(block), "length": len(block), "truncated": False,
            "source": conv.source, "location": str(conv.location),
            "messages": [{"role": "text", "content": tokenizer.decode(block)}], "tools": "",
            "covers": [(c.source, str(c.location)) for c in convs[first_doc:last_doc + 1]],
        })
    return rows


def _to_dataset(rows: list[dict[str, Any]]) -> "Dataset":
    from datasets import Dataset

    columns = ("input_ids", "labels", "length", "truncated", "source", "location", "messages", "tools")
    return Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


def _write(prepared: PreparedData, config: QatuneConfig, template_source: str, log: DropLog,
           splits: dict[str, list[dict[str, Any]]]) -> None:
    from datasets import DatasetDict

    from qatune.data.report import save_histogram

    out = prepared.output_dir
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": prepared.train}
    if prepared.validation is not None:
        parts["validation"] = prepared.validation
    DatasetDict(parts).save_to_disk(str(out / DATASET_DIR))
    if template_source:  # a base model's pt run has none
        (out / TEMPLATE_FILE).write_text(template_source, encoding="utf-8")
    (out / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
    with open(out / DROPS_FILE, "w", encoding="utf-8") as f:
        for drop in log.drops:
            f.write(json.dumps({"reason": drop.reason, "source": drop.source, "location": drop.location,
                                "detail": drop.detail}, ensure_ascii=False) + "\n")
    save_histogram({name: [r["length"] for r in rows] for name, rows in splits.items()},
                   config.data.max_length, out / HISTOGRAM_FILE)
    prepared.report["files"] = sorted({p.name for p in out.iterdir()} | {REPORT_FILE})
    (out / REPORT_FILE).write_text(json.dumps(prepared.report, ensure_ascii=False, indent=2), encoding="utf-8")


def fingerprint(config: QatuneConfig) -> str:
    """What a prepared dataset depends on: the data and model sections, qatune's version, and each
    input file's size and mtime. Equal fingerprints mean `prepare` would write the same dataset."""
    digest = hashlib.sha256()
    settings = {"data": config.data.model_dump(mode="json", exclude={"output_dir"}),
                "model": config.model.model_dump(mode="json"), "stage": config.train.stage, "version": __version__}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    data = config.data
    for source in data.sources + data.eval_sources + data.general_sources:
        root = Path(source.path)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            stat = path.stat() if path.exists() else None
            digest.update(f"{path}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def prepare_or_reuse(config: QatuneConfig) -> tuple[PreparedData, bool]:
    """The prepared dataset in data.output_dir when its inputs are unchanged, else a fresh `prepare`:
    a second training run on the same data does not tokenize it again. Returns (data, reused)."""
    out = Path(config.data.output_dir)
    try:
        written = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = {}
    if written.get("fingerprint") == fingerprint(config) and (out / DATASET_DIR).is_dir():
        return load_prepared(out), True
    return prepare(config), False


def load_prepared(output_dir: str | Path) -> PreparedData:
    """Read back what `prepare` wrote (the train stage starts from here)."""
    from datasets import load_from_disk

    out = Path(output_dir)
    report_path = out / REPORT_FILE
    if not report_path.is_file() or not (out / DATASET_DIR).is_dir():
        raise DataError(f"no prepared dataset here (missing {REPORT_FILE} or {DATASET_DIR}/)", Location(str(out)),
                        hint="run `qatune data prepare CONFIG` first")
    splits = load_from_disk(str(out / DATASET_DIR))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return PreparedData(out, splits["train"], splits["validation"] if "validation" in splits else None, report)


# ---------------------------------------------------------------------------------------------
# Validation only


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
    data = data.model_copy(update={"sources": sources, "general_sources": [], "eval_sources": [], "on_error": "skip"})
    loaded = load(data)
    return CheckResult(
        records=sum(s.read for s in loaded.sources),
        kept=len(loaded.domain),
        formats={s.name: sorted(s.formats) for s in loaded.sources},
        log=loaded.log,
    )

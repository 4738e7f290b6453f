"""The data stage: read -> convert -> clean -> split -> mix -> tokenize -> write, with its report.

A recipe (see `qatune.recipe`):
- `plan` checks the sources and the model, fingerprints the inputs and decides whether the dataset
  already in data.output_dir is theirs (then it is read back, not made again); it reads, never writes.
- `setup` loads the tokenizer and reads and cleans every record (or reads back the reusable dataset).
- `run` splits, mixes, tokenizes and (with `write`) replaces data.output_dir's dataset and report.

data.output_dir is the data stage's own folder, and writing there is the say-so to replace an earlier
prepared dataset (one of the same fingerprint is read back instead, with `reuse`). The say-so covers
qatune's own files only: a folder that is not a qatune data folder (no data_report.json with a
fingerprint) and is not empty, or a data folder that also holds other files, is refused in `plan`,
naming the files, before anything is written.

`prepare(config)` is the CLI's entry point; `prepare_or_reuse(config, tokenizer)` the train stage's,
with the tokenizer it has loaded already (one load per model). Which records are accepted and how
they become rows is the training stage's (`samples`, a `SampleBuilder`: by default the plug-in of
train.stage); this stage reads, cleans, splits and writes the same way for all.

`data.max_length` left unset is chosen from the data (`qatune.data.lengths`), and the chosen value is set
on the config, so the stages after (training, evaluation) use it too.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import __version__
from qatune import files as atomic
from qatune.compat.datasets import progress_bars_off
from qatune.config import DataConfig, QatuneConfig, SourceConfig
from qatune.data import clean
from qatune.data.records import Conversation, DropLog
from qatune.data.lengths import choose_max_length, max_length_unset, use_chosen_max_length
from qatune.data.sources import LoadedData, partition, source_files
from qatune.errors import DataError, Location
from qatune.runtime import Runtime

if TYPE_CHECKING:
    from datasets import Dataset

    from qatune.data.samples import SampleBuilder
    from qatune.data.templates import ChatTemplate

DATASET_DIR = "dataset"
REPORT_FILE = "data_report.json"
DROPS_FILE = "dropped.jsonl"
HISTOGRAM_FILE = "token_lengths.png"
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "config.yaml"
DATA_OUTPUTS = (DATASET_DIR, REPORT_FILE, DROPS_FILE, HISTOGRAM_FILE, TEMPLATE_FILE, CONFIG_FILE)


@dataclass
class PreparedData:
    """What `prepare` produced: the tokenized splits, the report, and where they were written."""

    output_dir: Path
    train: "Dataset"
    validation: "Dataset | None"
    report: dict[str, Any]


@dataclass(frozen=True)
class PreparePlan:
    config: QatuneConfig
    runtime: Runtime
    output_dir: Path
    write: bool  # False: the dataset is built in memory only
    fingerprint: str  # of everything the dataset depends on (see `fingerprint`)
    reuse: bool  # output_dir holds the dataset these inputs make: read it back instead
    # output_dir holds an earlier dataset that `run` replaces: a qatune data folder (data.output_dir)
    # holding only qatune's files; anything else was refused in `plan`.
    replaces: bool
    samples: "SampleBuilder"  # the training stage's records -> rows


@dataclass(frozen=True)
class PrepareComponents:
    started: float
    tokenizer: Any = None
    template: "ChatTemplate | None" = None
    samples: "SampleBuilder | None" = None
    loaded: LoadedData | None = None
    reused: PreparedData | None = None  # with plan.reuse, the dataset read back


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
# The recipe


def plan(config: QatuneConfig, runtime: Runtime, samples: "SampleBuilder", write: bool = True,
         reuse: bool = False) -> PreparePlan:
    """Check the model and every source, fingerprint the inputs, decide reuse. Reads only; loads nothing.
    `reuse`: read back the dataset in data.output_dir when its fingerprint is this one."""
    from qatune.models import locate_model

    data = config.data
    if not data.sources:
        raise DataError("data.sources is empty", hint="add at least one dataset: data.sources=[path/to/file.jsonl]")
    locate_model(config.model)  # first: a wrong model should fail before the data is even listed
    digest = fingerprint(config, source_files(data.sources + data.general_sources + data.eval_sources))
    out = Path(data.output_dir)
    written = _written_fingerprint(out)
    reusable = reuse and written == digest
    if write and not reusable:
        refuse_foreign_files(out)
    return PreparePlan(config, runtime, out, write, digest, reusable, replaces=write and not reusable and
                       written is not None, samples=samples)


def setup(plan: PreparePlan, tokenizer: Any = None) -> PrepareComponents:
    """The tokenizer (`tokenizer` when the caller loaded it already) and the cleaned records; with
    plan.reuse, the dataset read back instead."""
    from qatune.data.sources import load
    from qatune.models import load_tokenizer

    started = time.perf_counter()
    if plan.reuse:
        return PrepareComponents(started, reused=load_prepared(plan.output_dir))
    config = plan.config
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    template = plan.samples.template(tokenizer, config.data)
    return PrepareComponents(started, tokenizer, template, plan.samples, load(config.data))


def run(plan: PreparePlan, components: PrepareComponents) -> PreparedData:
    """Split, mix, tokenize; write dataset, report, drops and histogram when the plan says so."""
    from qatune.data import report as data_report
    from qatune.data.templates import template_metadata

    if components.reused is not None:
        if max_length_unset(plan.config.data):  # the dataset was cut at the length chosen for it then
            use_chosen_max_length(plan.config.data, components.reused.report["max_length"])
        return components.reused
    config, data, loaded = plan.config, plan.config.data, components.loaded
    rng = random.Random(data.seed)
    train, validation = split(loaded.domain, loaded.evaluation, data, rng)
    general = loaded.general
    if data.clean.leakage:
        kept = clean.drop_eval_leakage(train + general, validation, data.clean, loaded.log)
        train, general = partition(kept, train)
    decorate(train + validation, data, tag=True)
    decorate(general, data, tag=False)
    train, mix_info = mix(train, general, data, rng)
    choice = {"source": "config", "value": data.max_length}
    if max_length_unset(data):
        choice = choose_max_length(train + validation, components.tokenizer, components.template, data) or choice
        use_chosen_max_length(data, choice["value"])
    splits = _tokenize({"train": train, "validation": validation}, config, components)

    report = data_report.build_report(
        config=config, tokenizer=components.tokenizer, template=template_metadata(components.template),
        loaded=loaded, splits=splits, mix_info=mix_info, elapsed=time.perf_counter() - components.started,
        version=__version__,
    )
    report["fingerprint"] = plan.fingerprint
    report["max_length_choice"] = {**choice, **data_report.cut_share(report, loaded.log)}
    prepared = _prepared(plan.output_dir, splits, report)
    if plan.write:
        _write(prepared, plan, components.template.source, loaded.log, splits)
    if not splits["train"]:
        where = f"; every drop is listed in {prepared.output_dir / DROPS_FILE}" if plan.write else ""
        drops = ", ".join(f"{n} {reason}" for reason, n in loaded.log.by_reason().items()) or "none"
        raise DataError(f"no training sample left: {report['records_read']} records read, dropped: {drops}{where}",
                        hint="look at the drop reasons above; loosen data.clean thresholds or fix the data")
    return prepared


def prepare(config: QatuneConfig, runtime: Runtime | None = None, write: bool = True,
            samples: "SampleBuilder | None" = None) -> PreparedData:
    """Run the whole data stage and (by default) write dataset, report, drops, histogram. `samples`: the
    rows' maker, by default the plug-in of train.stage."""
    recipe_plan = plan(config, runtime or Runtime.detect(), samples or _stage_samples(config), write)
    return run(recipe_plan, setup(recipe_plan))


def prepare_or_reuse(config: QatuneConfig, tokenizer: Any = None, runtime: Runtime | None = None,
                     samples: "SampleBuilder | None" = None) -> tuple[PreparedData, bool]:
    """The prepared dataset in data.output_dir when its inputs are unchanged, else a fresh `prepare`
    (with `tokenizer` if given): a second training run on the same data does not tokenize it again.
    Returns (data, reused)."""
    recipe_plan = plan(config, runtime or Runtime.detect(), samples or _stage_samples(config), reuse=True)
    return run(recipe_plan, setup(recipe_plan, tokenizer)), recipe_plan.reuse


def _stage_samples(config: QatuneConfig) -> "SampleBuilder":
    """The training stage named by train.stage: it says which records it takes and the rows it makes."""
    from qatune import plugins

    return plugins.load("stage", config.train.stage)


# ---------------------------------------------------------------------------------------------
# Parts of the recipe


def fingerprint(config: QatuneConfig, inputs: list[tuple[SourceConfig, list[Path]]]) -> str:
    """What a prepared dataset depends on: the data and model sections, the stage, qatune's version, the
    sources as read (registry entries expanded) and each input file's content. Equal fingerprints mean
    `prepare` would write the same dataset. Content, not mtime: an edit within the file system's time
    resolution still counts, and a file touched but unchanged is still reused."""
    digest = hashlib.sha256()
    # An unset max_length is the data's choice (and the data is hashed below): the value the config holds
    # after an earlier prepare chose it must not make the same inputs look new.
    exclude = {"output_dir", "max_length"} if max_length_unset(config.data) else {"output_dir"}
    settings = {"data": config.data.model_dump(mode="json", exclude=exclude),
                "model": config.model.model_dump(mode="json"), "stage": config.train.stage, "version": __version__,
                "sources": [source.model_dump(mode="json") for source, _ in inputs]}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for _, files in inputs:
        for path in files:
            digest.update(f"\n{path}\n".encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()[:16]


def foreign_files(out: Path) -> list[str]:
    """What in data.output_dir is not the data stage's own: everything, when the folder is not a qatune data
    folder (no data_report.json with a fingerprint); else what is not one of `DATA_OUTPUTS`."""
    if not out.is_dir():
        return []
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                   if not (p.name.startswith(".") and ".tmp-" in p.name))  # a killed write's temporary file
    if not _is_data_folder(out):
        return names
    return [n for n in names if n.rstrip("/") not in DATA_OUTPUTS]


def refuse_foreign_files(out: Path) -> None:
    """Refuse to write a dataset into `out` when it holds files that are not the data stage's own."""
    foreign = foreign_files(out)
    if foreign:
        what = "is not a qatune data folder" if not _is_data_folder(out) else "holds files that are not qatune's"
        raise DataError(f"data.output_dir {what} and preparing would write into it beside "
                        f"{', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}", Location(str(out)),
                        hint="set data.output_dir to a new or empty folder (or one `qatune data prepare` wrote), "
                             "or move those files out")


def refuse_unless_data_folder(out: Path) -> None:
    """The train stage's early check (its plan, before an earlier run is deleted): a folder with files that
    is not a qatune data folder can never be reused, so preparing would write beside them: refused."""
    if not _is_data_folder(out):
        refuse_foreign_files(out)


def _is_data_folder(out: Path) -> bool:
    """Whether `out` is one `prepare` wrote: its data_report.json is a JSON object with a fingerprint."""
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "fingerprint" in report


def _written_fingerprint(out: Path) -> str | None:
    """The fingerprint of the dataset prepared in `out` (None: there is none; "" when it is unreadable)."""
    if not (out / REPORT_FILE).is_file() and not (out / DATASET_DIR).is_dir():
        return None
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(report.get("fingerprint", "")) if (out / DATASET_DIR).is_dir() else ""


def _tokenize(convs: dict[str, list[Conversation]], config: QatuneConfig,
              components: PrepareComponents) -> dict[str, list[dict[str, Any]]]:
    """Token rows per split (validation only when it has records), as the training stage makes them."""
    samples = components.samples
    samples.check_records(convs["train"] + convs["validation"])
    return {name: samples.make_rows(group, components.tokenizer, components.template, config.data,
                                    components.loaded.log)
            for name, group in convs.items() if name == "train" or group}


def _prepared(output_dir: Path, splits: dict[str, list[dict[str, Any]]], report: dict[str, Any]) -> PreparedData:
    from qatune.data.samples import to_dataset

    validation = splits.get("validation")
    return PreparedData(output_dir, to_dataset(splits["train"]), to_dataset(validation) if validation else None,
                        report)


def _write(prepared: PreparedData, plan: PreparePlan, template_source: str, log: DropLog,
           splits: dict[str, list[dict[str, Any]]]) -> None:
    from datasets import DatasetDict

    from qatune.data.report import save_histogram

    out = prepared.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if plan.replaces:  # the report goes first: a half-replaced dataset must never look reusable, yet stays ours
        atomic.write_json(out / REPORT_FILE, {"fingerprint": "", "state": "being replaced"})
    parts = {"train": prepared.train}
    if prepared.validation is not None:
        parts["validation"] = prepared.validation
    with progress_bars_off():  # the summary says what was written
        DatasetDict(parts).save_to_disk(str(out / DATASET_DIR))
    if template_source:  # a base model's pt run has none
        atomic.write_text(out / TEMPLATE_FILE, template_source)
    atomic.write_text(out / CONFIG_FILE, plan.config.to_yaml())
    atomic.write_text(out / DROPS_FILE, log.as_jsonl())
    with atomic.atomic_path(out / HISTOGRAM_FILE) as histogram:
        save_histogram({name: [r["length"] for r in rows] for name, rows in splits.items()},
                       plan.config.data.max_length, histogram)
    prepared.report["files"] = sorted({p.name for p in out.iterdir()} | {REPORT_FILE})
    atomic.write_json(out / REPORT_FILE, prepared.report)


def load_prepared(output_dir: str | Path) -> PreparedData:
    """Read back what `prepare` wrote (the train stage starts from here)."""
    from datasets import load_from_disk

    out = Path(output_dir)
    report_path = out / REPORT_FILE
    if not report_path.is_file() or not (out / DATASET_DIR).is_dir():
        raise DataError(f"no prepared dataset here (missing {REPORT_FILE} or {DATASET_DIR}/)", Location(str(out)),
                        hint="run `qatune data prepare CONFIG` first")
    with progress_bars_off():
        splits = load_from_disk(str(out / DATASET_DIR))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    return PreparedData(out, splits["train"], splits["validation"] if "validation" in splits else None, report)

"""The data report: `data_report.json`, the terminal summary and the token-length histogram."""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qatune.data.records import EVAL_LEAKAGE

if TYPE_CHECKING:
    from rich.console import Console

    from qatune.config import QatuneConfig
    from qatune.data.sources import LoadedData

PERCENTILES = (50, 90, 95, 99)
EXAMPLES_PER_REASON = 3


def length_stats(lengths: list[int]) -> dict[str, Any]:
    if not lengths:
        return {"min": 0, "max": 0, "mean": 0.0, **{f"p{p}": 0 for p in PERCENTILES}}
    arr = np.asarray(lengths)
    return {
        "min": int(arr.min()), "max": int(arr.max()), "mean": round(float(arr.mean()), 1),
        **{f"p{p}": int(np.percentile(arr, p)) for p in PERCENTILES},
    }


def build_report(*, config: "QatuneConfig", tokenizer: Any, template: dict[str, Any], loaded: "LoadedData",
                 splits: dict[str, list[dict[str, Any]]], mix_info: dict[str, Any], elapsed: float,
                 version: str) -> dict[str, Any]:
    log = loaded.log
    kept: dict[str, Counter] = defaultdict(Counter)  # source -> split -> records
    for split_name, rows in splits.items():
        seen: set[str] = set()
        for row in rows:
            # A long text may give several samples: count the record once. A packed pt block covers several.
            for source, location in row.get("covers") or [(row["source"], row["location"])]:
                if location not in seen:
                    seen.add(location)
                    kept[source][split_name] += 1
    drops_by_source = log.by_source()
    sources = [
        {
            "name": s.name, "role": s.role, "files": s.files, "formats": sorted(s.formats), "read": s.read,
            "kept": dict(kept.get(s.name, {})), "dropped": drops_by_source.get(s.name, {}),
        }
        for s in loaded.sources
    ]
    examples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for drop in log.drops:
        if len(examples[drop.reason]) < EXAMPLES_PER_REASON:
            examples[drop.reason].append({"source": drop.source, "location": drop.location, "detail": drop.detail})
    read = sum(s.read for s in loaded.sources)
    return {
        "qatune_version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": config.model.name_or_path,
        "tokenizer": tokenizer.name_or_path,
        "template": template,
        "max_length": config.data.max_length,
        "train_on_prompt": config.data.train_on_prompt,
        "records_read": read,
        "sources": sources,
        "drops": log.by_reason(),
        "drop_examples": dict(examples),
        "leakage_removed": log.by_reason().get(EVAL_LEAKAGE, 0),
        "mix": mix_info,
        # Tool schemas only reach the model through a template that renders `tools`.
        "records_with_tools": sum(1 for rows in splits.values() for r in rows if r["tools"]),
        "splits": {
            name: {
                "records": sum(kept[s][name] for s in kept),
                "samples": len(rows),
                "tokens": sum(r["length"] for r in rows),
                # preference rows are tokenized by TRL and count their answers' tokens themselves
                "label_tokens": sum(r["answer_tokens"] if "answer_tokens" in r else
                                    sum(1 for x in r["labels"] if x != -100) for r in rows),
                "truncated": sum(1 for r in rows if r["truncated"]),
                "length": length_stats([r["length"] for r in rows]),
            }
            for name, rows in splits.items()
        },
        "elapsed_s": round(elapsed, 2),
        "records_per_s": round(read / elapsed, 1) if elapsed > 0 else None,
    }


def cut_share(report: dict[str, Any], log: Any) -> dict[str, Any]:
    """The share of train samples max_length cut short (`truncated`) or dropped as too long, of all that
    reached tokenization: what the length costs, for a chosen and a configured one alike."""
    from qatune.data.records import TOO_LONG

    train = report["splits"].get("train", {})
    too_long = sum(1 for drop in log.drops if drop.reason == TOO_LONG)
    cut = train.get("truncated", 0) + too_long
    total = train.get("samples", 0) + too_long
    return {"cut": cut, "too_long_dropped": too_long, "cut_share": round(cut / total, 4) if total else 0.0}


def max_length_line(choice: dict[str, Any]) -> str:
    """One line on data.max_length: where it comes from and what share of the samples it cuts."""
    share = f"{choice['cut_share']:.1%} of train samples cut ({choice['too_long_dropped']} dropped as too long)"
    if choice["source"] == "data":
        return (f"max_length {choice['value']} chosen from the data (p{choice['percentile']} of "
                f"{choice['samples_measured']} samples' token lengths: {choice['measured']}): {share}; "
                "set data.max_length to choose it yourself")
    return f"max_length {choice['value']} (data.max_length): {share}"


def print_summary(report: dict[str, Any], console: "Console") -> None:
    """Records per source, drops per reason, token-length percentiles (CJK-width aware, via rich)."""
    from rich.table import Table

    table = Table(title="Records per source", title_justify="left")
    for col in ("source", "role", "format", "read", "train", "val", "dropped"):
        table.add_column(col, justify="left" if col in ("source", "role", "format") else "right")
    for s in report["sources"]:
        table.add_row(s["name"], s["role"], ",".join(s["formats"]), str(s["read"]),
                      str(s["kept"].get("train", 0)), str(s["kept"].get("validation", 0)),
                      str(sum(s["dropped"].values())))
    console.print(table)

    drops = Table(title="Dropped records (every one is in dropped.jsonl)", title_justify="left")
    for col in ("reason", "count", "first example"):
        drops.add_column(col, overflow="fold")
    for reason, count in report["drops"].items():
        example = report["drop_examples"].get(reason, [{}])[0]
        drops.add_row(reason, str(count), f"{example.get('location', '')}: {example.get('detail', '')}")
    if report["drops"]:
        console.print(drops)
    else:
        console.print("No record dropped.")

    lengths = Table(title="Tokens per sample", title_justify="left")
    for col in ("split", "samples", "tokens", "cut", "min", "p50", "p90", "p95", "p99", "max"):
        lengths.add_column(col, justify="right")
    for name, split in report["splits"].items():
        st = split["length"]
        lengths.add_row(name, str(split["samples"]), str(split["tokens"]), str(split["truncated"]),
                        *(str(st[k]) for k in ("min", "p50", "p90", "p95", "p99", "max")))
    console.print(lengths)
    if "max_length_choice" in report:  # reports written before the choice existed lack it
        console.print(max_length_line(report["max_length_choice"]))
    if report["records_with_tools"] and not report["template"]["renders_tools"]:
        console.print(f"[yellow]warning:[/] {report['records_with_tools']} samples carry tool schemas, but the "
                      "chat template does not render `tools`: the model will not see them.")
    if report["mix"]:
        mix = report["mix"]
        console.print(f"General data mixed {mix['ratio']}: {mix['general_used']} of {mix['general_available']} "
                      f"records used (share {mix['general_share']:.0%}).")
        if "warning" in mix:
            console.print(f"[yellow]warning:[/] {mix['warning']}")
    t = report["template"]
    console.print(f"Template: {t['name']}, end of turn {t['end_of_turn']!r} (id {t['end_of_turn_id']}); "
                  f"{report['records_read']} records in {report['elapsed_s']} s ({report['records_per_s']} records/s).")


def save_histogram(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bins = np.linspace(0, max(max_length, max((max(v) for v in lengths.values() if v), default=1)), 41)
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)})")
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title("Token lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

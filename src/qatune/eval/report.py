"""What an evaluation leaves behind: predictions, a review sheet for experts, and three reports.

- `predictions.<label>.jsonl`: one line per item: question, reference, prediction, its scores.
- `review_sheet.csv`: one row per answer with an empty 1-5 `score` column, UTF-8 with a BOM so
  that Excel shows Chinese; `qatune eval summarize` (`summarize_review_sheet`) aggregates the
  filled sheet.
- `eval_report.json` (everything), `eval_report.md`, and `eval_report.html`: self-contained,
  charts inline as SVG, no network needed to open it.
"""

from __future__ import annotations

import csv
import html
import io
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import files as atomic
from qatune.errors import Location
from qatune.eval.sets import EvalError

if TYPE_CHECKING:
    from rich.console import Console

REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"
REPORT_HTML = "eval_report.html"
REVIEW_SHEET = "review_sheet.csv"
SHEET_COLUMNS = ("set", "id", "model", "question", "reference", "answer", "score", "comment")
LOWER_IS_BETTER = ("perplexity", "latency_p50_s", "latency_p95_s", "empty_answers")
CHART_METRICS = ("bleu4", "rouge1", "rouge2", "rougeL", "token_f1", "exact_match", "accuracy")


def predictions_file(label: str) -> str:
    return f"predictions.{label}.jsonl"


def written_files(labels: list[str]) -> list[str]:
    """The names `write_all` writes for models with these labels (an evaluation plan says which it replaces)."""
    return [predictions_file(label) for label in labels] + [REVIEW_SHEET, REPORT_JSON, REPORT_MD, REPORT_HTML]


def write_all(report: dict[str, Any], predictions: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    """Write every file (each to a temporary name, then renamed); returns their names (the report lists them too)."""
    for label, rows in predictions.items():
        atomic.write_jsonl(out / predictions_file(label), rows)
    write_review_sheet(predictions, out / REVIEW_SHEET)
    files = written_files(list(predictions))
    report["files"] = files
    atomic.write_json(out / REPORT_JSON, report)
    atomic.write_text(out / REPORT_MD, markdown(report))
    atomic.write_text(out / REPORT_HTML, html_page(report))
    return files


def write_review_sheet(predictions: dict[str, list[dict[str, Any]]], path: Path) -> None:
    with atomic.atomic_path(path) as temporary, temporary.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SHEET_COLUMNS)
        for label, rows in predictions.items():
            for r in rows:
                if "prediction" in r:
                    writer.writerow([r["set"], r["id"], label, r["question"], r["reference"], r["prediction"], "", ""])


def summarize_review_sheet(sheet: str | Path) -> dict[str, Any]:
    """Aggregate the experts' 1-5 scores of a filled review sheet by set and model; an invalid score names its row."""
    path = Path(sheet)
    if not path.is_file():
        raise EvalError("no such review sheet", Location(str(path)))
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("model", "score") if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalError(f"the sheet has no column {', '.join(missing)}; it has {reader.fieldnames}",
                            Location(str(path)), hint=f"use the {REVIEW_SHEET} that qatune eval wrote")
        groups: dict[tuple[str, str], list[int]] = {}
        unscored: dict[tuple[str, str], int] = {}
        for line, row in enumerate(reader, start=2):
            key = (row.get("set") or "", row["model"] or "")
            text = (row["score"] or "").strip()
            if not text:
                unscored[key] = unscored.get(key, 0) + 1
                continue
            try:
                value = float(text)
            except ValueError:
                value = 0.0
            if value not in (1, 2, 3, 4, 5):
                raise EvalError(f"score {text!r} is not a whole number from 1 to 5", Location(str(path), line, "score"),
                                hint="score 1 (wrong or harmful) to 5 (correct and complete), or leave it empty")
            groups.setdefault(key, []).append(int(value))
    if not groups:
        raise EvalError("no row has a score yet", Location(str(path)), hint="fill the score column (1-5)")
    result = []
    for key in sorted(set(groups) | set(unscored)):
        values = groups.get(key, [])
        result.append({"set": key[0], "model": key[1], "scored": len(values), "unscored": unscored.get(key, 0),
                       "mean": statistics.mean(values) if values else None,
                       "median": statistics.median(values) if values else None,
                       "distribution": {str(s): values.count(s) for s in range(1, 6)}})
    return {"sheet": str(path), "groups": result}


# ---------------------------------------------------------------------------------------------
# Markdown and HTML


def _labels(report: dict[str, Any]) -> list[str]:
    return [m["label"] for m in report["models"]]


def _metric_rows(report: dict[str, Any], set_name: str) -> list[list[str]]:
    labels = _labels(report)
    by_model = report["scores"][set_name]
    rows = []
    for metric in by_model[labels[0]]:
        cells = [metric] + [_fmt(by_model[label].get(metric)) for label in labels]
        if "deltas" in report:
            delta = report["deltas"][set_name].get(metric)
            cells.append("" if delta is None else f"{delta:+.2f}")
        rows.append(cells)
    return rows


def _header(report: dict[str, Any]) -> list[str]:
    return ["metric", *_labels(report)] + (["delta (tuned - base)"] if "deltas" in report else [])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Evaluation report", ""]
    lines += [f"- {m['label']}: `{m['model']}`" + (f" + adapter `{m['adapter']}`" if m["adapter"] else "")
              for m in report["models"]]
    lines += [f"- decoding: {report['decoding']}; {report['dtype']} on {report['device']}; {report['created']}", ""]
    forgetting = forgetting_lines(report)
    lines += [f"**{line}**" if warning else f"- {line}" for line, warning in forgetting] + ([""] if forgetting else [])
    for s in report["sets"]:
        skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
        lines += [f"## {s['name']} ({s['role']}: {s['qa_items']} Q&A, {s['choice_items']} multiple choice; "
                  f"skipped: {skipped})", ""]
        header = _header(report)
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in _metric_rows(report, s["name"])]
        lines.append("")
    if report.get("side_by_side"):
        lines += ["## Side by side", "", "| question | reference | base | tuned |", "|---|---|---|---|"]
        lines += [f"| {_md_cell(r['question'])} | {_md_cell(r['reference'])} | {_md_cell(r['base'])} | "
                  f"{_md_cell(r['tuned'])} |" for r in report["side_by_side"]]
        lines.append("")
    lines += ["## How the numbers are computed", ""]
    lines += [f"- {k}: {v}" for k, v in report["methods"].items() if k != "bleu_signatures"]
    lines += [f"- sacrebleu signature ({lang}): `{sig}`" for lang, sig in report["methods"]["bleu_signatures"].items()]
    return "\n".join(lines) + "\n"


def forgetting_lines(report: dict[str, Any]) -> list[tuple[str, bool]]:
    """The forgetting check in words: (line, is_warning)."""
    forgetting = report.get("forgetting")
    if not forgetting:
        return []
    lines = [(w, True) for w in forgetting["warnings"]]
    if not forgetting["checked"]:
        lines.append((f"Note: {forgetting['note']}", False))
    for name, s in forgetting["sets"].items():
        lines.append((f"General accuracy on {name}: {s['base']:.1f} -> {s['tuned']:.1f} ({s['tuned'] - s['base']:+.1f} points; "
                      f"{s['right_to_wrong']} right->wrong, {s['wrong_to_right']} wrong->right of {s['items']})",
                      False))
    return lines


def print_summary(report: dict[str, Any], console: "Console") -> None:
    from rich.table import Table

    for name in report["scores"]:
        table = Table(title=name, title_justify="left")
        for i, header in enumerate(_header(report)):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in _metric_rows(report, name):
            table.add_row(*row)
        console.print(table)
    for line, warning in forgetting_lines(report):
        console.print(line, style="bold red" if warning else None, markup=False, highlight=False)


def _chart(report: dict[str, Any], set_name: str) -> str:
    """Grouped bars, one group per metric, one bar per model: an inline SVG string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(report)
    by_model = report["scores"][set_name]
    shown = [m for m in CHART_METRICS if by_model[labels[0]].get(m) is not None]
    if not shown:
        return ""
    # Text stays text in the SVG: the browser draws any script, Chinese set names included.
    with plt.rc_context({"svg.fonttype": "none"}):
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(shown), 3.2))
        width = 0.8 / len(labels)
        for k, label in enumerate(labels):
            xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(shown))]
            bars = ax.bar(xs, [by_model[label][m] for m in shown], width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(shown)), shown)
        ax.set_ylabel("score (0-100)")
        ax.legend(fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


_CSS = """body{font-family:system-ui,"Noto Sans CJK SC","Microsoft YaHei",sans-serif;margin:2em auto;max-width:1100px;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}.pos{color:#1a7f37}.neg{color:#c62828}
.warn{background:#fdecea;border:1px solid #c62828;padding:.6em 1em;font-weight:bold}.note{color:#555}
.sbs td{max-width:320px;white-space:pre-wrap;font-size:90%}"""


def html_page(report: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>qatune evaluation report</title>",
             f"<style>{_CSS}</style></head><body><h1>Evaluation report</h1><ul>"]
    parts += [f"<li>{e(m['label'])}: <code>{e(m['model'])}</code>"
              + (f" + adapter <code>{e(m['adapter'])}</code>" if m["adapter"] else "") + "</li>"
              for m in report["models"]]
    parts.append(f"<li>decoding {e(str(report['decoding']))}; {e(report['dtype'])} on {e(report['device'])}; "
                 f"{e(report['created'])}</li></ul>")
    parts += [f"<p class='{'warn' if warning else 'note'}'>{e(line)}</p>" for line, warning in forgetting_lines(report)]
    for s in report["sets"]:
        skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
        parts.append(f"<h2>{e(s['name'])}</h2><p class='note'>{e(s['role'])} set: {s['qa_items']} Q&amp;A, "
                     f"{s['choice_items']} multiple choice; skipped: {e(skipped)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _header(report)) + "</tr>")
        for row in _metric_rows(report, s["name"]):
            cells = [f"<td>{e(row[0])}</td>"] + [f"<td class='num'>{e(c)}</td>" for c in row[1:]]
            if "deltas" in report and row[-1] and float(row[-1]) != 0:
                better = row[-1].startswith("+") != (row[0] in LOWER_IS_BETTER)
                cells[-1] = f"<td class='num {'pos' if better else 'neg'}'>{e(row[-1])}</td>"
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>" + _chart(report, s["name"]))
    if report.get("side_by_side"):
        parts.append("<h2>Side by side</h2><table class='sbs'><tr><th>question</th><th>reference</th>"
                     "<th>base</th><th>tuned</th></tr>")
        parts += [f"<tr><td>{e(r['question'])}</td><td>{e(r['reference'])}</td><td>{e(r['base'])}</td>"
                  f"<td>{e(r['tuned'])}</td></tr>" for r in report["side_by_side"]]
        parts.append("</table>")
    parts.append("<h2>How the numbers are computed</h2><ul>")
    parts += [f"<li>{e(k)}: {e(str(v))}</li>" for k, v in report["methods"].items()]
    parts.append("</ul></body></html>\n")
    return "".join(parts)

"""What an evaluation leaves behind: predictions, a review sheet for experts, and three reports.

- `predictions.<label>.jsonl`: one line per item: question, reference, prediction, its scores.
- `review_sheet.csv`: one row per answer with an empty 1-5 `score` column, UTF-8 with a BOM so
  that Excel shows Chinese; `qatune eval summarize` (`summarize_review_sheet`) aggregates the
  filled sheet.
- `eval_report.json` (everything), `eval_report.md`, and `eval_report.html`: self-contained,
  charts inline as SVG, no network needed to open it. A comparison's deltas carry their paired
  interval and verdict; the gate's decision and the diagnosis ("what happened") come first.
"""

from __future__ import annotations

import csv
import html
import io
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import files as atomic
from qatune.errors import Location
from qatune.eval.compare import LOWER_IS_BETTER
from qatune.eval.confidence import NOT_SIGNIFICANT
from qatune.eval.sets import EvalError

if TYPE_CHECKING:
    from rich.console import Console

REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"
REPORT_HTML = "eval_report.html"
REVIEW_SHEET = "review_sheet.csv"
# `correction`: the answer as the expert would have it; `qatune data feedback` trains on it (SFT).
SHEET_COLUMNS = ("set", "id", "model", "question", "reference", "answer", "score", "comment", "correction")
# Filled by eval.judge when it scores (empty otherwise): beside the experts' `score`, for their agreement.
JUDGE_COLUMNS = ("judge_correctness", "judge_relevance", "judge_reasoning")
CHART_METRICS = ("bleu4", "rouge1", "rouge2", "rougeL", "token_f1", "exact_match", "accuracy")
PRESET_COLUMNS = ("rougeL", "token_f1", "loop_share", "echo_share", "truncated_share", "distinct_2")


def predictions_file(label: str) -> str:
    return f"predictions.{label}.jsonl"


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions.<label>.jsonl an earlier evaluation wrote."""
    if not path.is_file():
        raise EvalError("no such predictions file", Location(str(path)),
                        hint="give the output folder of an earlier `qatune eval --compare` (eval.gate.previous)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise EvalError(f"not a JSON line ({exc.msg})", Location(str(path), line)) from None
    return rows


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
        writer.writerow(SHEET_COLUMNS + JUDGE_COLUMNS)
        for label, rows in predictions.items():
            for r in rows:
                if "prediction" in r:
                    judge = r.get("judge") or {}
                    writer.writerow([r["set"], r["id"], label, r["question"], r["reference"], r["prediction"], "", "",
                                     "", judge.get("correctness", ""), judge.get("relevance", ""),
                                     judge.get("reasoning", "")])


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
        with_judge: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (expert, judge correctness)
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
            judged = (row.get("judge_correctness") or "").strip()
            if judged.isdigit():
                with_judge.setdefault(key, []).append((int(value), int(judged)))
    if not groups:
        raise EvalError("no row has a score yet", Location(str(path)), hint="fill the score column (1-5)")
    result = []
    for key in sorted(set(groups) | set(unscored)):
        values = groups.get(key, [])
        result.append({"set": key[0], "model": key[1], "scored": len(values), "unscored": unscored.get(key, 0),
                       "mean": statistics.mean(values) if values else None,
                       "median": statistics.median(values) if values else None,
                       "distribution": {str(s): values.count(s) for s in range(1, 6)},
                       **({"judge_agreement": judge_agreement(with_judge[key])} if key in with_judge else {})})
    return {"sheet": str(path), "groups": result}


def judge_agreement(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Expert against judge (correctness) on the same answers: the share equal, within one point, and Spearman's rho."""
    import numpy as np

    expert, judge = (np.asarray(column, dtype=float) for column in zip(*pairs))
    gap = np.abs(expert - judge)
    rho = None
    if len(pairs) > 2 and expert.std() > 0 and judge.std() > 0:
        def ranks(values: Any) -> Any:  # average ranks, as Spearman's rho needs with ties
            order = values.argsort(kind="stable")
            ranked = np.empty(len(values))
            ranked[order] = np.arange(len(values), dtype=float)
            for v in np.unique(values):
                ranked[values == v] = ranked[values == v].mean()
            return ranked

        rho = float(np.corrcoef(ranks(expert), ranks(judge))[0, 1])
    return {"pairs": len(pairs), "exact": 100 * float((gap == 0).mean()), "within_one": 100 * float((gap <= 1).mean()),
            "spearman": rho}


# ---------------------------------------------------------------------------------------------
# Markdown and HTML


def _labels(report: dict[str, Any]) -> list[str]:
    return [m["label"] for m in report["models"]]


def _metric_rows(report: dict[str, Any], set_name: str) -> list[list[str]]:
    """metric, each model's value; in a comparison also the delta, its interval and the verdict."""
    labels = _labels(report)
    by_model = report["scores"][set_name]
    rows = []
    for metric, value in by_model[labels[0]].items():
        if isinstance(value, dict | list):  # decoding presets (a table of their own), the judge's intervals
            continue
        cells = [metric] + [_fmt(by_model[label].get(metric)) for label in labels]
        if "deltas" in report:
            delta = report["deltas"][set_name].get(metric)
            interval = report.get("intervals", {}).get(set_name, {}).get(metric)
            cells.append("" if delta is None else f"{delta:+.2f}")
            cells += _interval_cells(interval)
        rows.append(cells)
    return rows


def _interval_cells(interval: dict[str, Any] | None) -> list[str]:
    if interval is None:
        return ["", ""]
    span = f"{interval['low']:+.2f} to {interval['high']:+.2f}"
    if interval["p_value"] is not None:
        span += f" (McNemar p={interval['p_value']:.2g})"
    return [span, "significant" if interval["significant"] else NOT_SIGNIFICANT]


def _level(report: dict[str, Any]) -> str:
    return f"{report['confidence']['level'] * 100:g}%"


def _header(report: dict[str, Any]) -> list[str]:
    compared = ["delta (tuned - base)", f"{_level(report)} interval", "verdict"] if "deltas" in report else []
    return ["metric", *_labels(report), *compared]


def _verdict_class(metric: str, cells: list[str]) -> str:
    """pos/neg for a significant change, by whether it is better; '' otherwise."""
    if cells[-1] != "significant" or not cells[-3]:
        return ""
    return "pos" if cells[-3].startswith("+") != (metric in LOWER_IS_BETTER) else "neg"


def _preset_rows(report: dict[str, Any], set_name: str) -> list[list[str]]:
    """Per decoding preset and model: the headline text metrics and degenerate shares."""
    rows = []
    for label in _labels(report):
        for preset, found in report["scores"][set_name][label].get("presets", {}).items():
            if found:
                rows.append([preset, label, *(_fmt(found.get(m)) for m in PRESET_COLUMNS)])
    return rows


def diagnosis_lines(report: dict[str, Any]) -> list[str]:
    """The "what happened" section: one line per check that fired (title: evidence. Fix: ...), then notes."""
    found = report.get("diagnosis")
    if not found:
        return []
    lines = [f"{f['title']}: {f['evidence']}. Fix: {f['fix']}." for f in found["findings"]]
    if not lines:
        lines.append("No diagnosis check fired.")
    return lines + [f"Note: {note}" for note in found["notes"]]


def judge_lines(report: dict[str, Any]) -> list[str]:
    """The judge in words: who judged, malformed replies, mean scores with intervals, pairwise win rates."""
    judged = report.get("judge")
    if not judged:
        return []
    lines = [f"Judge: {judged['judge']} ({judged['mode']})"]
    for label, counts in judged.get("scored", {}).items():
        lines.append(f"Judge scores for {label}: {counts['judged']} answers scored, {counts['malformed']} malformed "
                     "replies (left unscored)")
        for set_name, by_model in report["scores"].items():
            found = by_model.get(label, {})
            for name in ("judge_correctness", "judge_relevance"):
                if name in found:
                    low, high = found[f"{name}_interval"]
                    lines.append(f"  {set_name}: {name} {found[name]:.2f} ({_level(report)} CI {low:.2f} to {high:.2f})")
    for set_name, found in judged.get("pairwise", {}).items():
        if "win_rate" in found:
            low, high = found["interval"]
            verdict = "significant" if found["significant"] else NOT_SIGNIFICANT
            lines.append(f"Pairwise on {set_name}: tuned wins {found['win_rate']:.1f}% ({_level(report)} CI {low:.1f} to "
                         f"{high:.1f}, {verdict}; {found['tuned_wins']} wins, {found['ties']} ties, "
                         f"{found['base_wins']} losses; {found['malformed']} malformed replies)")
        else:
            lines.append(f"Pairwise on {set_name}: no usable verdict ({found['malformed']} malformed replies)")
    return lines


def gate_lines(report: dict[str, Any]) -> list[tuple[str, bool]]:
    """The promotion gate in words: (line, is_failure)."""
    decision = report.get("gate")
    if not decision:
        return []
    if decision["passed"]:
        return [(f"GATE PASSED: {len(decision['checked'])} metric checks within their margins, no forgetting warning",
                 False)]
    return [("GATE FAILED: " + reason, True) for reason in decision["reasons"]]


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
    headline = gate_lines(report) + forgetting_lines(report)
    lines += [f"**{line}**" if warning else f"- {line}" for line, warning in headline] + ([""] if headline else [])
    what_happened = diagnosis_lines(report)
    if what_happened:
        lines += ["## What happened", "", *(f"- {line}" for line in what_happened), ""]
    if judge_lines(report):
        lines += ["## Judge", "", *(f"- {line.strip()}" for line in judge_lines(report)), ""]
    for s in report["sets"]:
        skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
        lines += [f"## {s['name']} ({s['role']}: {s['qa_items']} Q&A, {s['choice_items']} multiple choice; "
                  f"skipped: {skipped})", ""]
        header = _header(report)
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in _metric_rows(report, s["name"])]
        lines.append("")
        presets = _preset_rows(report, s["name"])
        if presets:
            lines += ["| decoding | model | " + " | ".join(PRESET_COLUMNS) + " |", "|" + "---|" * (2 + len(PRESET_COLUMNS))]
            lines += ["| " + " | ".join(row) + " |" for row in presets] + [""]
    if report.get("side_by_side"):
        lines += ["## Side by side", "", "| question | reference | base | tuned |", "|---|---|---|---|"]
        lines += [f"| {_md_cell(r['question'])} | {_md_cell(r['reference'])} | {_md_cell(_flagged(r, 'base'))} | "
                  f"{_md_cell(_flagged(r, 'tuned'))} |" for r in report["side_by_side"]]
        lines.append("")
    lines += ["## How the numbers are computed", ""]
    lines += [f"- {k}: {v}" for k, v in report["methods"].items() if k != "bleu_signatures"]
    lines += [f"- sacrebleu signature ({lang}): `{sig}`" for lang, sig in report["methods"]["bleu_signatures"].items()]
    return "\n".join(lines) + "\n"


def _flagged(row: dict[str, Any], label: str) -> str:
    flags = row.get(f"{label}_flags") or []
    return (f"[{', '.join(flags)}] " if flags else "") + row[label]


def forgetting_lines(report: dict[str, Any]) -> list[tuple[str, bool]]:
    """The forgetting check in words: (line, is_warning)."""
    forgetting = report.get("forgetting")
    if not forgetting:
        return []
    lines = [(w, True) for w in forgetting["warnings"]]
    if not forgetting["checked"]:
        lines.append((f"Note: {forgetting['note']}", False))
    for name, s in forgetting["sets"].items():
        interval = s["interval"]
        verdict = "significant" if interval["significant"] else NOT_SIGNIFICANT
        lines.append((f"General accuracy on {name}: {s['base']:.1f} -> {s['tuned']:.1f} ({s['tuned'] - s['base']:+.1f} points, "
                      f"{interval['level'] * 100:g}% CI {interval['low']:+.1f} to {interval['high']:+.1f}, {verdict}; "
                      f"{s['right_to_wrong']} right->wrong, {s['wrong_to_right']} wrong->right of {s['items']}, "
                      f"McNemar p={interval['p_value']:.2g})", False))
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
    for line, warning in gate_lines(report) + forgetting_lines(report):
        console.print(line, style="bold red" if warning else None, markup=False, highlight=False)
    what_happened = diagnosis_lines(report)
    if what_happened:
        console.print("What happened:", style="bold")
        for line in what_happened:
            console.print(f"- {line}", markup=False, highlight=False)
    for line in judge_lines(report):
        console.print(line, markup=False, highlight=False)


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
.sbs td{max-width:320px;white-space:pre-wrap;font-size:90%}.sbs td.degenerate{background:#fff4e5}
.flag{display:inline-block;background:#e65100;color:#fff;border-radius:3px;padding:0 5px;margin-right:3px;
font-size:80%}"""


def _html_answer(row: dict[str, Any], label: str) -> str:
    """One answer cell; a degenerate answer is shaded and its flags named above it."""
    flags = row.get(f"{label}_flags") or []
    if not flags:
        return f"<td>{html.escape(row[label])}</td>"
    badges = "".join(f"<span class='flag'>{html.escape(f)}</span>" for f in flags)
    return f"<td class='degenerate' data-flags='{html.escape(' '.join(flags))}'>{badges}<br>{html.escape(row[label])}</td>"


def html_page(report: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>qatune evaluation report</title>",
             f"<style>{_CSS}</style></head><body><h1>Evaluation report</h1><ul>"]
    parts += [f"<li>{e(m['label'])}: <code>{e(m['model'])}</code>"
              + (f" + adapter <code>{e(m['adapter'])}</code>" if m["adapter"] else "") + "</li>"
              for m in report["models"]]
    parts.append(f"<li>decoding {e(str(report['decoding']))}; {e(report['dtype'])} on {e(report['device'])}; "
                 f"{e(report['created'])}</li></ul>")
    parts += [f"<p class='{'warn' if warning else 'note'}'>{e(line)}</p>"
              for line, warning in gate_lines(report) + forgetting_lines(report)]
    what_happened = diagnosis_lines(report)
    if what_happened:
        parts.append("<h2>What happened</h2><ul class='diagnosis'>" + "".join(f"<li>{e(line)}</li>"
                                                                             for line in what_happened) + "</ul>")
    if judge_lines(report):
        parts.append("<h2>Judge</h2><ul>" + "".join(f"<li>{e(line.strip())}</li>" for line in judge_lines(report))
                     + "</ul>")
    for s in report["sets"]:
        skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
        parts.append(f"<h2>{e(s['name'])}</h2><p class='note'>{e(s['role'])} set: {s['qa_items']} Q&amp;A, "
                     f"{s['choice_items']} multiple choice; skipped: {e(skipped)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _header(report)) + "</tr>")
        for row in _metric_rows(report, s["name"]):
            cells = [f"<td>{e(row[0])}</td>"] + [f"<td class='num'>{e(c)}</td>" for c in row[1:]]
            verdict = _verdict_class(row[0], row) if "deltas" in report else ""
            if verdict:
                cells[-3] = f"<td class='num {verdict}'>{e(row[-3])}</td>"
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
        presets = _preset_rows(report, s["name"])
        if presets:
            parts.append("<table><tr><th>decoding</th><th>model</th>" + "".join(f"<th>{e(c)}</th>" for c in PRESET_COLUMNS)
                         + "</tr>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                                             for row in presets) + "</table>")
        parts.append(_chart(report, s["name"]))
    if report.get("side_by_side"):
        parts.append("<h2>Side by side</h2><table class='sbs'><tr><th>question</th><th>reference</th>"
                     "<th>base</th><th>tuned</th></tr>")
        parts += [f"<tr><td>{e(r['question'])}</td><td>{e(r['reference'])}</td>{_html_answer(r, 'base')}"
                  f"{_html_answer(r, 'tuned')}</tr>" for r in report["side_by_side"]]
        parts.append("</table>")
    parts.append("<h2>How the numbers are computed</h2><ul>")
    parts += [f"<li>{e(k)}: {e(str(v))}</li>" for k, v in report["methods"].items()]
    parts.append("</ul></body></html>\n")
    return "".join(parts)

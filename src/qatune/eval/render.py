"""The evaluation report for people: eval_report.md, eval_report.html (self-contained, charts inline as
SVG, no network needed to open it) and the console summary. A comparison's deltas carry their paired
interval and verdict; the gate's decision and the diagnosis ("what happened") come first."""

from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING, Any

from qatune.eval.compare import LOWER_IS_BETTER
from qatune.eval.confidence import NOT_SIGNIFICANT
from qatune.eval.report import EvalReport

if TYPE_CHECKING:
    from rich.console import Console

CHART_METRICS = ("bleu4", "rouge1", "rouge2", "rougeL", "token_f1", "exact_match", "accuracy")
PRESET_COLUMNS = ("rougeL", "token_f1", "loop_share", "echo_share", "truncated_share", "distinct_2")


def _labels(report: EvalReport) -> list[str]:
    return [m["label"] for m in report.models]


def _metric_rows(report: EvalReport, set_name: str) -> list[list[str]]:
    """metric, each model's value; in a comparison also the delta, its interval and the verdict."""
    labels = _labels(report)
    by_model = report.scores[set_name]
    rows = []
    for metric, value in by_model[labels[0]].items():
        if isinstance(value, dict | list):  # decoding presets (a table of their own), the judge's intervals
            continue
        cells = [metric] + [_fmt(by_model[label].get(metric)) for label in labels]
        if report.deltas is not None:
            delta = report.deltas[set_name].get(metric)
            interval = (report.intervals or {}).get(set_name, {}).get(metric)
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


def _level(report: EvalReport) -> str:
    return f"{report.confidence['level'] * 100:g}%"


def _header(report: EvalReport) -> list[str]:
    compared = ["delta (tuned - base)", f"{_level(report)} interval", "verdict"] if report.deltas is not None else []
    return ["metric", *_labels(report), *compared]


def _verdict_class(metric: str, cells: list[str]) -> str:
    """pos/neg for a significant change, by whether it is better; '' otherwise."""
    if cells[-1] != "significant" or not cells[-3]:
        return ""
    return "pos" if cells[-3].startswith("+") != (metric in LOWER_IS_BETTER) else "neg"


def _preset_rows(report: EvalReport, set_name: str) -> list[list[str]]:
    """Per decoding preset and model: the headline text metrics and degenerate shares."""
    rows = []
    for label in _labels(report):
        for preset, found in report.scores[set_name][label].get("presets", {}).items():
            if found:
                rows.append([preset, label, *(_fmt(found.get(m)) for m in PRESET_COLUMNS)])
    return rows


def diagnosis_lines(found: dict[str, Any] | None) -> list[str]:
    """The "what happened" section (the report's `diagnosis`): one line per check that fired (title: evidence.
    Fix: ...), then notes."""
    if not found:
        return []
    lines = [f"{f['title']}: {f['evidence']}. Fix: {f['fix']}." for f in found["findings"]]
    if not lines:
        lines.append("No diagnosis check fired.")
    return lines + [f"Note: {note}" for note in found["notes"]]


def judge_lines(report: EvalReport) -> list[str]:
    """The judge in words: who judged, malformed replies, mean scores with intervals, pairwise win rates."""
    judged = report.judge
    if not judged:
        return []
    lines = [f"Judge: {judged['judge']} ({judged['mode']})"]
    for label, counts in judged.get("scored", {}).items():
        lines.append(f"Judge scores for {label}: {counts['judged']} answers scored, {counts['malformed']} malformed "
                     "replies (left unscored)")
        for set_name, by_model in report.scores.items():
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


def gate_lines(decision: dict[str, Any] | None) -> list[tuple[str, bool]]:
    """The promotion gate (the report's `gate`) in words: (line, is_failure)."""
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


def markdown(report: EvalReport) -> str:
    lines = ["# Evaluation report", ""]
    lines += [f"- {m['label']}: `{m['model']}`" + (f" + adapter `{m['adapter']}`" if m["adapter"] else "")
              for m in report.models]
    lines += [f"- decoding: {report.decoding}; {report.dtype} on {report.device}; {report.created}", ""]
    headline = gate_lines(report.gate) + forgetting_lines(report.forgetting)
    lines += [f"**{line}**" if warning else f"- {line}" for line, warning in headline] + ([""] if headline else [])
    what_happened = diagnosis_lines(report.diagnosis)
    if what_happened:
        lines += ["## What happened", "", *(f"- {line}" for line in what_happened), ""]
    if judge_lines(report):
        lines += ["## Judge", "", *(f"- {line.strip()}" for line in judge_lines(report)), ""]
    for s in report.sets:
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
    if report.side_by_side:
        lines += ["## Side by side", "", "| question | reference | base | tuned |", "|---|---|---|---|"]
        lines += [f"| {_md_cell(r['question'])} | {_md_cell(r['reference'])} | {_md_cell(_flagged(r, 'base'))} | "
                  f"{_md_cell(_flagged(r, 'tuned'))} |" for r in report.side_by_side]
        lines.append("")
    lines += ["## How the numbers are computed", ""]
    lines += [f"- {k}: {v}" for k, v in report.methods.items() if k != "bleu_signatures"]
    lines += [f"- sacrebleu signature ({lang}): `{sig}`" for lang, sig in report.methods["bleu_signatures"].items()]
    return "\n".join(lines) + "\n"


def _flagged(row: dict[str, Any], label: str) -> str:
    flags = row.get(f"{label}_flags") or []
    return (f"[{', '.join(flags)}] " if flags else "") + row[label]


def forgetting_lines(forgetting: dict[str, Any] | None) -> list[tuple[str, bool]]:
    """The forgetting check (the report's `forgetting`) in words: (line, is_warning)."""
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


def print_summary(report: EvalReport, console: "Console") -> None:
    from rich.table import Table

    for name in report.scores:
        table = Table(title=name, title_justify="left")
        for i, header in enumerate(_header(report)):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in _metric_rows(report, name):
            table.add_row(*row)
        console.print(table)
    for line, warning in gate_lines(report.gate) + forgetting_lines(report.forgetting):
        console.print(line, style="bold red" if warning else None, markup=False, highlight=False)
    what_happened = diagnosis_lines(report.diagnosis)
    if what_happened:
        console.print("What happened:", style="bold")
        for line in what_happened:
            console.print(f"- {line}", markup=False, highlight=False)
    for line in judge_lines(report):
        console.print(line, markup=False, highlight=False)


def _chart(report: EvalReport, set_name: str) -> str:
    """Grouped bars, one group per metric, one bar per model: an inline SVG string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(report)
    by_model = report.scores[set_name]
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


def html_page(report: EvalReport) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>qatune evaluation report</title>",
             f"<style>{_CSS}</style></head><body><h1>Evaluation report</h1><ul>"]
    parts += [f"<li>{e(m['label'])}: <code>{e(m['model'])}</code>"
              + (f" + adapter <code>{e(m['adapter'])}</code>" if m["adapter"] else "") + "</li>"
              for m in report.models]
    parts.append(f"<li>decoding {e(str(report.decoding))}; {e(report.dtype)} on {e(report.device)}; "
                 f"{e(report.created)}</li></ul>")
    parts += [f"<p class='{'warn' if warning else 'note'}'>{e(line)}</p>"
              for line, warning in gate_lines(report.gate) + forgetting_lines(report.forgetting)]
    what_happened = diagnosis_lines(report.diagnosis)
    if what_happened:
        parts.append("<h2>What happened</h2><ul class='diagnosis'>" + "".join(f"<li>{e(line)}</li>"
                                                                             for line in what_happened) + "</ul>")
    if judge_lines(report):
        parts.append("<h2>Judge</h2><ul>" + "".join(f"<li>{e(line.strip())}</li>" for line in judge_lines(report))
                     + "</ul>")
    for s in report.sets:
        skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
        parts.append(f"<h2>{e(s['name'])}</h2><p class='note'>{e(s['role'])} set: {s['qa_items']} Q&amp;A, "
                     f"{s['choice_items']} multiple choice; skipped: {e(skipped)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _header(report)) + "</tr>")
        for row in _metric_rows(report, s["name"]):
            cells = [f"<td>{e(row[0])}</td>"] + [f"<td class='num'>{e(c)}</td>" for c in row[1:]]
            verdict = _verdict_class(row[0], row) if report.deltas is not None else ""
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
    if report.side_by_side:
        parts.append("<h2>Side by side</h2><table class='sbs'><tr><th>question</th><th>reference</th>"
                     "<th>base</th><th>tuned</th></tr>")
        parts += [f"<tr><td>{e(r['question'])}</td><td>{e(r['reference'])}</td>{_html_answer(r, 'base')}"
                  f"{_html_answer(r, 'tuned')}</tr>" for r in report.side_by_side]
        parts.append("</table>")
    parts.append("<h2>How the numbers are computed</h2><ul>")
    parts += [f"<li>{e(k)}: {e(str(v))}</li>" for k, v in report.methods.items()]
    parts.append("</ul></body></html>\n")
    return "".join(parts)

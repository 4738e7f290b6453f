"""The export report: export_report.json (`ExportReport`), the same in words in export_report.md, and the
lines the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qatune.export.checks import NEAR_TIE

# What each check's answers are compared with, where the check does not say.
CHECKED_AGAINST = {"merged": "base + adapter", "saved": "the model as loaded"}


@dataclass
class ExportReport:
    """export_report.json: what was exported, and each written form checked against the model it came from."""

    qatune_version: str
    model: str
    adapter: str | None  # merged into the model
    dtype: str  # of the merged safetensors
    gguf: str | None  # --gguf's type
    gguf_adapter: bool
    quantize: str | None
    template: str
    end_of_turn: str
    checks: dict[str, dict[str, Any]]  # by form (merged, saved, gguf..., the quantized copy)
    gguf_perplexity: dict[str, Any] | None  # the GGUF files' perplexity on held-out answers, or why not measured
    smoke_answer: dict[str, str] | None  # the first check question and the merged model's answer
    wall_time_s: float = 0.0
    files: dict[str, float] = field(default_factory=dict)  # each file (and quantized folder) with its MiB


def check_lines(report: ExportReport) -> list[str]:
    """One line per check: how many greedy answers were identical, to what, in which engine."""
    lines = []
    for kind, check in report.checks.items():
        if not check.get("checked", True):
            lines.append(f"{kind}: not checked ({check['why']})")
            continue
        against = check.get("against") or CHECKED_AGAINST.get(kind, "the merged model")
        line = f"{kind}: {check['identical']}/{check['questions']} greedy answers identical to {against}"
        if "engine" in check:
            line += f" ({check['file']}{' + ' + check['adapter'] if 'adapter' in check else ''} in {check['engine']})"
        if "size_mib" in check:
            line += f"; {check['size_mib']:.0f} MiB against {check['merged_size_mib']:.0f} MiB merged"
        lines.append(line)
        lines += [f"  differs from token {a['first_difference']}{_gap(a)}: {a['question']!r}: expected "
                  f"{a['expected']!r}, got {a['got']!r}"
                  for a in check.get("answers", []) if a.get("first_difference") is not None]
        lines += [f"  llama.cpp's own tokenizer splits the prompt of {a['question']!r} differently from qatune's"
                  for a in check.get("answers", []) if a.get("llama_cpp_tokenizer_agrees") is False]
    return lines


def _gap(answer: dict[str, Any]) -> str:
    gap = answer.get("logit_gap")
    if gap is None:
        return ""
    verdict = "a near tie: rounding, not a wrong weight" if gap < NEAR_TIE else "not a near tie: check the weights"
    return f" (llama.cpp's logit for the expected token {gap:.3f} below its pick: {verdict})"


def perplexity_lines(report: ExportReport) -> list[str]:
    section = report.gguf_perplexity
    if not section:
        return []
    if not section["measured"]:
        return [f"GGUF perplexity: not measured ({section['why']})"]
    head = f"GGUF perplexity on {section['records']} held-out answers ({section['tokens']} tokens) of {section['set']}:"
    return [head] + [f"  {name}: {v['perplexity']:.3f}" + (f" ({v['vs_f16_percent']:+.1f}% vs f16)"
                                                           if v["vs_f16_percent"] else "")
                     for name, v in section["files"].items()]


def markdown(report: ExportReport) -> str:
    """export_report.md: files, checks, and the GGUF perplexities."""
    out = [f"# Export of {report.model}" + (f" + {report.adapter}" if report.adapter else ""), "",
           "| file | MiB |", "| --- | ---: |"]
    out += [f"| {name} | {size:,.1f} |" for name, size in report.files.items()]
    out += ["", "## Checks", ""] + [f"- {line.strip()}" for line in check_lines(report)]
    section = report.gguf_perplexity
    if section and section["measured"]:
        out += ["", f"## Perplexity in llama.cpp ({section['records']} held-out answers, {section['tokens']} tokens "
                f"of {section['set']})", "", "| file | perplexity | vs f16 |", "| --- | ---: | ---: |"]
        out += [f"| {name} | {v['perplexity']:.3f} | {v['vs_f16_percent']:+.2f}% |"
                for name, v in section["files"].items()]
    elif section:
        out += ["", f"Perplexity: not measured ({section['why']})."]
    return "\n".join(out) + "\n"

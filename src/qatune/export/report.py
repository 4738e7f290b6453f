"""The export report in words: export_report.md beside export_report.json, and the lines the CLI prints."""

from __future__ import annotations

from typing import Any

from qatune.export.checks import NEAR_TIE

# What each check's answers are compared with, where the check does not say.
CHECKED_AGAINST = {"merged": "base + adapter", "saved": "the model as loaded"}


def check_lines(report: dict[str, Any]) -> list[str]:
    """One line per check: how many greedy answers were identical, to what, in which engine."""
    lines = []
    for kind, check in report["checks"].items():
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


def perplexity_lines(report: dict[str, Any]) -> list[str]:
    section = report.get("gguf_perplexity")
    if not section:
        return []
    if not section["measured"]:
        return [f"GGUF perplexity: not measured ({section['why']})"]
    head = f"GGUF perplexity on {section['records']} held-out answers ({section['tokens']} tokens) of {section['set']}:"
    return [head] + [f"  {name}: {v['perplexity']:.3f}" + (f" ({v['vs_f16_percent']:+.1f}% vs f16)"
                                                           if v["vs_f16_percent"] else "")
                     for name, v in section["files"].items()]


def markdown(report: dict[str, Any]) -> str:
    """export_report.md: files, checks, and the GGUF perplexities."""
    out = [f"# Export of {report['model']}" + (f" + {report['adapter']}" if report.get("adapter") else ""), "",
           "| file | MiB |", "| --- | ---: |"]
    out += [f"| {name} | {size:,.1f} |" for name, size in report.get("files", {}).items()]
    out += ["", "## Checks", ""] + [f"- {line.strip()}" for line in check_lines(report)]
    section = report.get("gguf_perplexity")
    if section and section["measured"]:
        out += ["", f"## Perplexity in llama.cpp ({section['records']} held-out answers, {section['tokens']} tokens "
                f"of {section['set']})", "", "| file | perplexity | vs f16 |", "| --- | ---: | ---: |"]
        out += [f"| {name} | {v['perplexity']:.3f} | {v['vs_f16_percent']:+.2f}% |"
                for name, v in section["files"].items()]
    elif section:
        out += ["", f"Perplexity: not measured ({section['why']})."]
    return "\n".join(out) + "\n"

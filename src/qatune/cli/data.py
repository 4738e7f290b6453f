"""`qatune data prepare | check | from-docs | augment | answer | feedback`."""

from __future__ import annotations

import argparse

from qatune.cli.common import UsageError, config_from, make_runtime, split_args


def cmd_data_prepare(ns: argparse.Namespace) -> int:
    from qatune.data.prepare import prepare
    from qatune.data.report import print_summary

    runtime = make_runtime()
    result = prepare(config_from(ns), runtime)
    print_summary(result.report, runtime.console)
    runtime.console.print(f"Wrote {result.output_dir}/ ({', '.join(result.report['files'])})")
    return 0


def cmd_data_check(ns: argparse.Namespace) -> int:
    from qatune.config import DataConfig, SourceConfig
    from qatune.data.sources import check

    source = SourceConfig(path=ns.file, format=ns.format, dataset=ns.dataset)
    data = DataConfig(encoding=ns.encoding)
    result = check([source], data)
    for drop in result.log.drops:
        print(f"{drop.location}: {drop.reason}: {drop.detail}")
    formats = "; ".join(f"{name}: {', '.join(f) or '?'}" for name, f in result.formats.items())
    by_reason = ", ".join(f"{n} {r}" for r, n in result.log.by_reason().items()) or "no problem"
    print(f"{result.records} records ({formats}): {result.kept} usable; {by_reason}.")
    return 1 if result.errors else 0


def _print_synth(result, console) -> None:
    by_reason = ", ".join(f"{n} {r}" for r, n in result.log.by_reason().items()) or "none"
    console.print(result.summary)
    console.print(f"Wrote {len(result.records)} records to {result.output} (dropped: {by_reason}; every drop is in "
                  f"{result.output.with_suffix('.dropped.jsonl')}, the report in "
                  f"{result.output.with_suffix('.report.json')})")


def cmd_data_from_docs(ns: argparse.Namespace) -> int:
    from qatune.synth.from_docs import from_docs

    plain, _ = split_args(ns.args)
    if not plain:
        raise UsageError("qatune data from-docs needs the folder (or file) of documents",
                         hint="qatune data from-docs DIR [CONFIG] [KEY=VALUE ...]")
    runtime = make_runtime()
    _print_synth(from_docs(config_from(ns, plain[1:]), plain[0], runtime), runtime.console)
    return 0


def cmd_data_answer(ns: argparse.Namespace) -> int:
    from qatune.synth.answer import answer

    plain, _ = split_args(ns.args)
    if not plain:
        raise UsageError("qatune data answer needs the question list (.txt, one a line, or .jsonl)",
                         hint="qatune data answer QUESTIONS [CONFIG] [KEY=VALUE ...] [--endpoint URL "
                              "--endpoint-model NAME]")
    runtime = make_runtime()
    _print_synth(answer(config_from(ns, plain[1:]), plain[0], runtime), runtime.console)
    return 0


def cmd_data_feedback(ns: argparse.Namespace) -> int:
    from qatune.data.feedback import feedback

    plain, _ = split_args(ns.args)
    sheets = [p for p in plain if p.lower().endswith((".csv", ".tsv"))]
    if not sheets:
        raise UsageError("qatune data feedback needs at least one filled review sheet (.csv)",
                         hint="qatune data feedback REVIEW_SHEET.csv [MORE.csv ...] [CONFIG] [KEY=VALUE ...]")
    result = feedback(config_from(ns, [p for p in plain if p not in sheets]), sheets)
    r = result.report
    dropped = ", ".join(f"{n} {k}" for k, n in r["dpo_dropped"].items()) or "none"
    unused = ", ".join(f"{n} {k}" for k, n in r["unused_rows"].items()) or "none"
    agree = r["agreement"]
    print(f"{r['rows']} rows, {r['answers']} answers to {r['questions']} questions: {r['dpo_pairs']} DPO pairs "
          f"(left out: {dropped}), {r['kto_examples']} KTO examples, {r['sft_records']} SFT corrections.")
    if agree["pairs_compared"]:
        print(f"Reviewer agreement on {agree['answers_scored_by_several']} answers: {agree['exact']:.0%} exact, "
              f"{agree['within_one']:.0%} within one point.")
    print(f"Rows not used: {unused} (each in {result.output_dir / 'unused.jsonl'}). Wrote {result.output_dir}/.")
    return 0


def cmd_data_augment(ns: argparse.Namespace) -> int:
    from qatune.synth.augment import augment

    runtime = make_runtime()
    _print_synth(augment(config_from(ns), runtime), runtime.console)
    return 0

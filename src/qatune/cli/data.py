"""`qatune data prepare | check | from-docs | augment | answer | feedback`."""

from __future__ import annotations

import argparse

from qatune.cli.common import OVERRIDES_HELP, UsageError, config_from, make_runtime, split_args


ENDPOINT_FLAG_KEYS = {"endpoint": "endpoint.url", "endpoint_model": "endpoint.model"}


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


def _endpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible API (…/v1) writes instead of the "
                        "local model (endpoint.url)")
    parser.add_argument("--endpoint-model", metavar="NAME", help="the model name the endpoint serves (endpoint.model)")


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


def add_commands(stages: argparse._SubParsersAction) -> None:
    data = stages.add_parser("data", help="prepare, check or grow training data")
    data_cmds = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = data_cmds.add_parser(
        "prepare", help="read, clean, split, tokenize and write the dataset with its report",
        description="Writes data.output_dir/: dataset/ (Arrow), data_report.json, dropped.jsonl, "
        "token_lengths.png, chat_template.jinja, config.yaml.",
    )
    prep.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help=OVERRIDES_HELP)
    prep.set_defaults(run=cmd_data_prepare)
    chk = data_cmds.add_parser("check", help="validate a data file or folder without writing; list every problem")
    chk.add_argument("file", help="data file, folder, or LLaMA-Factory dataset_info.json (with --dataset)")
    chk.add_argument("--format", default="auto",
                     choices=["auto", "alpaca", "qa", "input_target", "sharegpt", "messages", "text", "preference",
                              "kto"])
    chk.add_argument("--dataset", default=None, help="names in a LLaMA-Factory registry, comma-separated")
    chk.add_argument("--encoding", default="utf-8", help="text encoding, e.g. gb18030")
    chk.set_defaults(run=cmd_data_check)
    docs = data_cmds.add_parser(
        "from-docs", help="generate Q&A pairs citing their source from .md/.txt/.pdf documents with a model",
        description="Splits the documents by headings and paragraphs, asks the model (--model, default: the "
        "embedded one) for Q&A pairs per chunk through a prompt you can replace (--prompt), drops duplicates of "
        "the existing data (--against, default data.sources) and writes a qa-format JSONL whose records carry "
        "`source` {file, section, lines}, plus FILE.report.json and FILE.dropped.jsonl.",
    )
    docs.add_argument("args", nargs="*", metavar="DIR [CONFIG] [KEY=VALUE]",
                      help="folder (or file) of .md, .txt and .pdf documents, then " + OVERRIDES_HELP)
    docs.add_argument("--model", help="generating model: default, a Hugging Face folder, a .gguf file or a hub id")
    docs.add_argument("--out", metavar="FILE", help="output .jsonl (from_docs.output)")
    docs.add_argument("--prompt", metavar="FILE", help="prompt template file (from_docs.prompt)")
    docs.add_argument("--against", action="append", metavar="FILE", help="existing data to deduplicate against")
    docs.add_argument("--force", action="store_true", help="replace an existing output file")
    _endpoint_flags(docs)
    docs.set_defaults(run=cmd_data_from_docs, flag_keys={
        "model": "model.name_or_path", "out": "from_docs.output", "prompt": "from_docs.prompt",
        "against": "from_docs.against", "force": "from_docs.overwrite", **ENDPOINT_FLAG_KEYS})
    aug = data_cmds.add_parser(
        "augment", help="add question paraphrases generated by a model, deduplicated, with provenance",
        description="Asks the model for paraphrases of every single-turn question of the data (--data, default "
        "data.sources), keeps at most --per-question new ones that duplicate neither an original question nor "
        "each other, and writes them with the original answer and a `provenance` field to a new qa-format JSONL, "
        "plus FILE.report.json and FILE.dropped.jsonl. Add it to data.sources beside the original data.",
    )
    aug.add_argument("args", nargs="*", metavar="[CONFIG] [KEY=VALUE]", help=OVERRIDES_HELP)
    aug.add_argument("--model", help="generating model: default, a Hugging Face folder, a .gguf file or a hub id")
    aug.add_argument("--data", action="append", metavar="FILE", help="dataset to paraphrase (repeatable)")
    aug.add_argument("--out", metavar="FILE", help="output .jsonl (augment.output)")
    aug.add_argument("--prompt", metavar="FILE", help="prompt template file (augment.prompt)")
    aug.add_argument("--per-question", type=int, metavar="N", help="paraphrases kept per question at most")
    aug.add_argument("--force", action="store_true", help="replace an existing output file")
    _endpoint_flags(aug)
    aug.set_defaults(run=cmd_data_augment, flag_keys={
        "model": "model.name_or_path", "data": "data.sources", "out": "augment.output", "prompt": "augment.prompt",
        "per_question": "augment.per_question", "force": "augment.overwrite", **ENDPOINT_FLAG_KEYS})
    ans = data_cmds.add_parser(
        "answer", help="a teacher (the model, or an OpenAI-compatible endpoint) answers a question list",
        description="Sequence-level distillation: every question of QUESTIONS (.txt, one a line, or .jsonl with "
        "a `question` field) is answered by the model (--model) or by an OpenAI-compatible endpoint (--endpoint "
        "URL --endpoint-model NAME, key from the variable endpoint.api_key_env names), and written as a qa JSONL "
        "with `provenance` {teacher, prompt, source}, plus FILE.report.json and FILE.dropped.jsonl. A stopped "
        "run resumes: answered questions are skipped.",
    )
    ans.add_argument("args", nargs="*", metavar="QUESTIONS [CONFIG] [KEY=VALUE]",
                     help="the question list, then " + OVERRIDES_HELP)
    ans.add_argument("--model", help="answering model: default, a Hugging Face folder, a .gguf file or a hub id")
    ans.add_argument("--out", metavar="FILE", help="output .jsonl (answer.output)")
    ans.add_argument("--force", action="store_true", help="replace an existing output file")
    _endpoint_flags(ans)
    ans.set_defaults(run=cmd_data_answer, flag_keys={
        "model": "model.name_or_path", "out": "answer.output", "force": "answer.overwrite", **ENDPOINT_FLAG_KEYS})

    fb = data_cmds.add_parser(
        "feedback", help="experts' review-sheet scores -> DPO pairs, KTO examples and SFT corrections",
        description="Reads filled review sheets (several sheets, or a `reviewer` column, for several reviewers) "
        "and writes to feedback.output_dir: dpo.jsonl (per question the best- against the worst-scored answer, "
        "when their mean scores differ by feedback.margin), kto.jsonl (desirable at feedback.desirable_at or "
        "above, undesirable at feedback.undesirable_at or below), sft.jsonl (the filled `correction` column), "
        "unused.jsonl (every row left out, with its reason) and feedback_report.json (counts, reviewer agreement). "
        "Every record carries its provenance: sheet, row, reviewer, scores.",
    )
    fb.add_argument("args", nargs="*", metavar="SHEET.csv [SHEET.csv ...] [CONFIG] [KEY=VALUE]",
                    help="the filled review sheets, then " + OVERRIDES_HELP)
    fb.add_argument("--out", metavar="DIR", help="output folder (feedback.output_dir)")
    fb.add_argument("--force", action="store_true", help="replace the files an earlier run wrote there")
    fb.set_defaults(run=cmd_data_feedback, flag_keys={"out": "feedback.output_dir", "force": "feedback.overwrite"})

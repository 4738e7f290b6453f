"""The `qatune` command: parses arguments, loads the config, calls a stage, prints. Nothing more.

Heavy libraries (torch, transformers, datasets) are imported by the stages, so `qatune --help`
and config errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence

from qatune import __version__
from qatune.errors import QatuneError

OVERRIDES_HELP = "section.key=value overrides, e.g. data.max_length=512 model=path/to/model"


OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")  # `section.key=value`; a path or a question is not one


class UsageError(QatuneError):
    """Arguments that do not go together."""


def _positionals(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The plain arguments and the `key=value` overrides, in the order given (flags may stand between)."""
    plain = [a for a in args if not OVERRIDE.match(a)]
    return plain, [a for a in args if OVERRIDE.match(a)]


def _config(ns: argparse.Namespace, plain: Sequence[str] | None = None, extra: Sequence[str] = ()):
    """The one override path of every command: CONFIG, its `key=value` overrides, then each given flag
    as the key it stands for (`--model M` is model.name_or_path=M, so model.dtype=... stays)."""
    from qatune.config import load_config

    found, overrides = _positionals(ns.args)
    plain = found if plain is None else list(plain)
    if len(plain) > 1:
        raise UsageError(f"expected at most one CONFIG file, got {', '.join(plain)}",
                         hint="overrides are written section.key=value")
    for attr, key in getattr(ns, "flag_keys", {}).items():
        value = getattr(ns, attr)
        # `is not False`, not `!= False`: a flag given as 0 must reach the config's checks, not vanish.
        if value is not None and value is not False and value != []:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: paths stay strings
    return load_config(plain[0] if plain else None, [*overrides, *extra])


def _runtime():
    from rich.console import Console

    from qatune.runtime import Runtime

    return Runtime.detect(Console())


def cmd_config_show(ns: argparse.Namespace) -> int:
    print(_config(ns).to_yaml(), end="")
    return 0


def cmd_config_docs(ns: argparse.Namespace) -> int:
    from qatune.config import config_reference

    print(config_reference(), end="")
    return 0


def cmd_data_prepare(ns: argparse.Namespace) -> int:
    from qatune.data.prepare import prepare
    from qatune.data.report import print_summary

    runtime = _runtime()
    result = prepare(_config(ns), runtime)
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


ENDPOINT_FLAG_KEYS = {"endpoint": "endpoint.url", "endpoint_model": "endpoint.model"}


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

    plain, _ = _positionals(ns.args)
    if not plain:
        raise UsageError("qatune data from-docs needs the folder (or file) of documents",
                         hint="qatune data from-docs DIR [CONFIG] [KEY=VALUE ...]")
    runtime = _runtime()
    _print_synth(from_docs(_config(ns, plain[1:]), plain[0], runtime), runtime.console)
    return 0


def cmd_data_answer(ns: argparse.Namespace) -> int:
    from qatune.synth.answer import answer

    plain, _ = _positionals(ns.args)
    if not plain:
        raise UsageError("qatune data answer needs the question list (.txt, one a line, or .jsonl)",
                         hint="qatune data answer QUESTIONS [CONFIG] [KEY=VALUE ...] [--endpoint URL "
                              "--endpoint-model NAME]")
    runtime = _runtime()
    _print_synth(answer(_config(ns, plain[1:]), plain[0], runtime), runtime.console)
    return 0


def cmd_data_feedback(ns: argparse.Namespace) -> int:
    from qatune.data.feedback import feedback

    plain, _ = _positionals(ns.args)
    sheets = [p for p in plain if p.lower().endswith((".csv", ".tsv"))]
    if not sheets:
        raise UsageError("qatune data feedback needs at least one filled review sheet (.csv)",
                         hint="qatune data feedback REVIEW_SHEET.csv [MORE.csv ...] [CONFIG] [KEY=VALUE ...]")
    result = feedback(_config(ns, [p for p in plain if p not in sheets]), sheets)
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

    runtime = _runtime()
    _print_synth(augment(_config(ns), runtime), runtime.console)
    return 0


def cmd_tune(ns: argparse.Namespace) -> int:
    from rich.table import Table

    from qatune.train.tune import tune

    config = _config(ns)
    runtime = _runtime()
    result = tune(config, runtime)
    summary, console = result.summary, runtime.console
    table = Table(title=f"Study {summary['study']}", title_justify="left")
    for column in ("trial", "state", "best eval loss", "params"):
        table.add_column(column)
    for t in summary["trials"]:
        params = ", ".join(f"{k}={v:.3g}" for k, v in t["params"].items())
        table.add_row(str(t["number"]), t["state"], "-" if t["value"] is None else f"{t['value']:.4f}", params)
    console.print(table)
    if result.interrupted:
        console.print(f"Interrupted: run the same command again to resume ({summary['storage']}).")
        return 130
    if result.best_config:
        console.print(f"Best: trial {summary['best']['number']} (eval loss {summary['best']['value']:.4f}); "
                      f"train it with: qatune train {result.best_config}")
    console.print(f"Wrote {result.output_dir}/ ({', '.join(summary['files'])})")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from qatune.train import report
    from qatune.train.run import TrainCompleted, TrainInterrupted
    from qatune.workflow import train_and_evaluate

    config = _config(ns)  # a config error is reported once, before any process starts
    if ns.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(ns.nproc, ["train", *ns.args, *(a for attr, flag in (("model", "--model"), ("data", "--data"))
                                                      for value in _as_list(getattr(ns, attr)) for a in (flag, value))])
    runtime = _runtime()
    result, evaluation = train_and_evaluate(config, runtime)
    if isinstance(result, TrainInterrupted):
        return 130
    if not isinstance(result, TrainCompleted):  # another rank of a distributed run: rank 0 reports
        return 0
    console = runtime.console
    report.print_summary(result.report, console)
    if result.preview:
        report.print_preview(result.preview, console)
    if evaluation is not None:
        from qatune.eval.report import print_summary as print_eval

        print_eval(evaluation.report, console)
        console.print(f"Evaluation: {evaluation.output_dir}/eval_report.html")
    console.print(f"Wrote {result.output_dir}/ ({', '.join(result.report['files'])})")
    return 0


def _as_list(value: object) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _launch(nproc: int, qatune_args: list[str]) -> int:
    """Run `qatune ARGS` as `nproc` processes on this machine under torchrun (gloo on CPU, nccl on GPU)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "qatune", *qatune_args]
    print("launching: " + " ".join(command[2:]), file=sys.stderr)
    return subprocess.call(command)


def cmd_eval(ns: argparse.Namespace) -> int:
    from qatune.eval import report
    from qatune.eval.run import ModelSpec, evaluate, tuned_spec

    plain, _ = _positionals(ns.args)
    if plain[:1] == ["summarize"]:
        return _eval_summarize(plain[1:])
    if ns.compare and (ns.model or ns.adapter):
        raise UsageError("give either --compare BASE TUNED or --model M [--adapter A], not both")
    config = _config(ns, extra=[f"model.name_or_path={json.dumps(ns.compare[0])}"] if ns.compare else [])
    if ns.compare:
        specs = [ModelSpec("base", ns.compare[0]), tuned_spec(ns.compare[1], ns.compare[0])]
    else:
        specs = [ModelSpec("model", config.model.name_or_path, ns.adapter)]
    runtime = _runtime()
    result = evaluate(config, specs, runtime=runtime)
    report.print_summary(result.report, runtime.console)
    runtime.console.print(f"Wrote {result.output_dir}/ ({', '.join(result.report['files'])})")
    gate = result.report.get("gate")
    if gate is not None and not gate["passed"]:  # a pipeline promotes only what passed: a distinct exit code
        print("the promotion gate failed:\n" + "\n".join(f"- {r}" for r in gate["reasons"]), file=sys.stderr)
        return 3
    return 0


def _eval_summarize(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from qatune.eval.report import summarize_review_sheet

    if len(args) != 1:
        raise UsageError("usage: qatune eval summarize SHEET.csv")
    summary = summarize_review_sheet(args[0])
    table = Table(title=f"Expert scores: {summary['sheet']}", title_justify="left")
    for column in ("set", "model", "scored", "unscored", "mean", "median", "1", "2", "3", "4", "5"):
        table.add_column(column, justify="left" if column in ("set", "model") else "right")
    for g in summary["groups"]:
        table.add_row(g["set"], g["model"], str(g["scored"]), str(g["unscored"]),
                      "-" if g["mean"] is None else f"{g['mean']:.2f}",
                      "-" if g["median"] is None else f"{g['median']:g}",
                      *(str(g["distribution"][str(s)]) for s in range(1, 6)))
    Console().print(table)
    for g in summary["groups"]:
        if "judge_agreement" in g:  # eval.judge scored the same answers
            a = g["judge_agreement"]
            rho = "-" if a["spearman"] is None else f"{a['spearman']:.2f}"
            print(f"{g['set']} {g['model']}: expert vs judge on {a['pairs']} answers: {a['exact']:.0f}% equal, "
                  f"{a['within_one']:.0f}% within one point, Spearman {rho}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from qatune.export.run import export, print_summary

    config = _config(ns)
    runtime = _runtime()
    result = export(config, runtime)
    print_summary(result.report, runtime.console)
    runtime.console.print(f"Wrote {result.output_dir}/ (report: {result.output_dir}/export_report.json and .md)")
    return 0


def _chat_session(ns: argparse.Namespace, plain: Sequence[str]):
    from qatune.infer.chat import ChatSession

    return ChatSession.load(_config(ns, plain), _runtime(), ns.adapter, ns.system)


def cmd_chat(ns: argparse.Namespace) -> int:
    from qatune.infer.chat import chat_loop

    chat_loop(_chat_session(ns, _positionals(ns.args)[0]))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    plain, _ = _positionals(ns.args)
    if not plain:
        raise UsageError("qatune generate needs the question (quote it)",
                         hint='qatune generate [CONFIG] [KEY=VALUE ...] "QUESTION"')
    for piece in _chat_session(ns, plain[:-1]).ask(plain[-1]):  # the question comes last, after any CONFIG
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from qatune.serve.recipe import serve

    if ns.adapter:  # given on the command line, these replace the config's serve.adapters
        adapters = {}
        for item in ns.adapter:
            name, _, folder = item.rpartition("=")
            adapters[name or folder.rstrip("/").rsplit("/", 1)[-1]] = folder  # a bare folder: its own name
        ns.adapter = adapters
    serve(_config(ns), _runtime())
    return 0


def cmd_studio(ns: argparse.Namespace) -> int:
    from qatune.studio.app import serve_studio

    serve_studio(ns.workspace, ns.host, ns.port, ns.token or os.environ.get("QATUNE_STUDIO_TOKEN"))
    return 0


def _stage_parser(stages: argparse._SubParsersAction, name: str, summary: str, description: str,
                  run: Callable[[argparse.Namespace], int], flag_keys: dict[str, str] | None = None,
                  positionals: str = "[CONFIG] [KEY=VALUE]") -> argparse.ArgumentParser:
    """A stage command: `[CONFIG] [KEY=VALUE ...]` and `--model`, like every stage; `flag_keys` names the
    config key each of its flags stands for (the one override path, `_config`)."""
    parser = stages.add_parser(name, help=summary, description=description,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar=positionals, help=OVERRIDES_HELP)
    parser.add_argument("--model", help="model: default, a Hugging Face folder, a .gguf file or a hub id")
    parser.set_defaults(run=run, flag_keys={"model": "model.name_or_path", **(flag_keys or {})})
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatune",
        description="Turn an open LLaMA-family model and your Q&A data into a domain assistant.",
    )
    parser.add_argument("--version", action="version", version=f"qatune {__version__}")
    stages = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = stages.add_parser("config", help="show the resolved config or its reference")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_cmds.add_parser("show", help="print the resolved config: FILE plus overrides")
    show.add_argument("args", nargs="*", metavar="[FILE] [KEY=VALUE]", help=OVERRIDES_HELP)
    show.set_defaults(run=cmd_config_show)
    docs = config_cmds.add_parser("docs", help="print the config reference (Markdown) generated from the schema")
    docs.set_defaults(run=cmd_config_docs)

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

    trn = _stage_parser(
        stages, "train", "fine-tune a model on your data (lora, qlora, full, freeze, prefix)",
        "Prepares the data (or reuses it when unchanged), trains, and writes train.output_dir/: "
        "adapter or weights (safetensors), tokenizer, config.yaml, train_report.json, loss_curve.png, "
        "checkpoints and TensorBoard logs. Ctrl-C saves a checkpoint; train.resume=true continues.",
        cmd_train, {"data": "data.sources"})
    trn.add_argument("--data", action="append", metavar="FILE", help="training data file or folder (repeatable)")
    trn.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train with N data-parallel processes on this machine (torchrun; see train.distributed)")

    evl = _stage_parser(
        stages, "eval", "evaluate a model, or compare base and fine-tuned (metrics, forgetting check, reports)",
        "qatune eval [CONFIG] [KEY=VALUE] --model M [--adapter A] --data FILE [--general FILE]\n"
        "qatune eval [CONFIG] --compare BASE TUNED --data FILE [--general FILE] [--gate]\n"
        "qatune eval summarize review_sheet.csv\n\n"
        "Writes eval.output_dir/: eval_report.json/.md/.html, predictions.<model>.jsonl and review_sheet.csv "
        "(fill its score column 1-5, then run `qatune eval summarize`).",
        cmd_eval, {"data": "eval.data", "general": "eval.general", "out": "eval.output_dir", "gate": "eval.gate.enabled"})
    evl.add_argument("--adapter", help="LoRA/prefix adapter folder (a qatune train output) to put on --model")
    evl.add_argument("--compare", nargs=2, metavar=("BASE", "TUNED"),
                     help="evaluate BASE and TUNED (an adapter folder on BASE, or a whole model) side by side")
    evl.add_argument("--data", action="append", metavar="FILE", help="domain evaluation set (repeatable)")
    evl.add_argument("--general", action="append", metavar="FILE",
                     help="general multiple-choice set for the forgetting check (repeatable)")
    evl.add_argument("--out", metavar="DIR", help="output folder (eval.output_dir)")
    evl.add_argument("--gate", action="store_true",
                     help="with --compare: exit 3, with the reason, when TUNED is worse than BASE beyond "
                          "eval.gate.metrics' margins or forgets (eval.gate)")

    tun = _stage_parser(
        stages, "tune", "search learning rate, LoRA rank/alpha, epochs and warm-up with Optuna",
        "qatune tune CONFIG --trials N [KEY=VALUE]\n\nEach trial trains in tune.output_dir/trial-N and is "
        "pruned when its eval loss trails earlier trials. The study is kept in tune.output_dir/study.db: run the "
        "same command again to resume. Writes best_config.yaml (train it with `qatune train`), "
        "tune_summary.json and optimization_history.png.", cmd_tune, {"trials": "tune.trials"})
    tun.add_argument("--trials", type=int, metavar="N", help="trials the study should hold (tune.trials)")

    exp = _stage_parser(
        stages, "export", "merge an adapter, write a Hugging Face folder, GGUF (llama.cpp, Ollama) or a quantized copy",
        "qatune export --model M --adapter A --out DIR [--gguf f16|bf16|q8_0|q4_k_m|q5_k_m|q6_k] [--gguf-adapter] "
        "[--quantize int8|bnb-8bit|bnb-4bit]"
        "\n\nWrites DIR/: merged safetensors (sharded), config, tokenizer with its chat template, generation config; "
        "model-<type>.gguf and an Ollama Modelfile (checked in llama.cpp where installed: greedy answers, perplexity); "
        "adapter.gguf, base-<type>.gguf and Modelfile.adapter; int8/ or bnb-*/ quantized copies; export_report.json with a "
        "greedy-answer check of every form against base + adapter.",
        cmd_export, {"adapter": "export.adapter", "out": "export.output_dir", "gguf": "export.gguf",
                     "quantize": "export.quantize", "force": "export.overwrite", "gguf_adapter": "export.gguf_adapter"})
    exp.add_argument("--adapter", help="LoRA adapter folder to merge (a qatune train output)")
    exp.add_argument("--out", metavar="DIR", help="output folder (export.output_dir); must be empty")
    exp.add_argument("--gguf", choices=["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                     help="also write a GGUF file and an Ollama Modelfile (k-quants: pip install 'qatune[llamacpp]')")
    exp.add_argument("--gguf-adapter", action="store_true",
                     help="also write the LoRA adapter as a GGUF adapter, its base as GGUF, and Modelfile.adapter")
    exp.add_argument("--quantize", choices=["int8", "bnb-8bit", "bnb-4bit"],
                     help="also write a quantized copy (int8: torchao; bnb-*: bitsandbytes, CUDA or CPU)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty output folder")

    decoding = "Decoding follows serve.decoding: temperature (0.7), top_p (0.9), repetition_penalty, " \
               "max_new_tokens; e.g. serve.decoding.temperature=0 for greedy answers."
    cht = _stage_parser(stages, "chat", "talk to a model in the terminal (streaming, with history)",
                        f"Commands: /reset starts a new conversation, /exit leaves.\n\n{decoding}", cmd_chat)
    gen = _stage_parser(stages, "generate", "answer one question and exit", decoding, cmd_generate,
                        positionals="[CONFIG] [KEY=VALUE] QUESTION")
    for parser_ in (cht, gen):
        parser_.add_argument("--adapter", help="LoRA/prefix adapter folder (a qatune train output) to put on --model")
        parser_.add_argument("--system", help="system prompt")

    srv = _stage_parser(
        stages, "serve", "serve the model and its adapters over HTTP (OpenAI-compatible API, chat page, metrics)",
        "qatune serve [CONFIG] --model M [--adapter NAME=FOLDER ...] [--host H] [--port P]\n"
        "             [--engine auto|hf|llamacpp|vllm]\n\n"
        "Routes: POST /v1/chat/completions, /v1/completions (stream over SSE), GET /v1/models, POST /answer, "
        "GET /health, GET /metrics (Prometheus), GET / (chat page). Concurrent requests are batched "
        "together (serve.max_batch_size); serve.api_key (or env QATUNE_API_KEY) requires a Bearer key.",
        cmd_serve, {"host": "serve.host", "port": "serve.port", "engine": "serve.engine", "adapter": "serve.adapters"})
    srv.add_argument("--adapter", action="append", metavar="NAME=FOLDER",
                     help="LoRA adapter served as model NAME on the one base model (repeatable)")
    srv.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="TCP port (serve.port, default 8000)")
    srv.add_argument("--engine", choices=["auto", "hf", "llamacpp", "vllm"],
                     help="serve.engine: auto (default), hf (CPU or GPU), llamacpp (GGUF on the CPU) or vllm (a CUDA GPU, "
                          "or the CPU with vLLM's CPU build: make vllm)")

    std = stages.add_parser(
        "studio", help="the whole road in the browser: data, train, evaluate, chat, export over a workspace folder",
        description="Pages over a workspace folder; every step runs the qatune command it shows (kept in "
        "WORKSPACE/.studio/jobs/ with its log), and runs are folders in WORKSPACE/runs/.")
    std.add_argument("--workspace", default=".", help="folder of data files, runs and exports (default: here)")
    std.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    std.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    std.add_argument("--token", help="require this token (open the page with ?token=...; env QATUNE_STUDIO_TOKEN)")
    std.set_defaults(run=cmd_studio)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags and `key=value` overrides in any order: argparse leaves the overrides after a flag over,
    and they join the command's own."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown or (rest and not hasattr(ns, "args")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    if rest:
        ns.args = [*ns.args, *rest]
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # torchao (for --quantize int8), once installed, is imported by transformers and logs its CUDA-kernel
    # probes, and torch complains about how it registers enums: noise for every command. bitsandbytes
    # (imported by peft) warns on an AVX512-BF16 CPU that it could not fetch a 4-bit kernel from the Hub
    # (`pip install kernels` would make it download one at import): its own kernel runs instead.
    for noisy in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ns = parse_args(argv)
    try:
        return ns.run(ns)
    except QatuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`qatune eval`: one model, base against tuned (`--compare`, `--gate`), `summarize` a review sheet."""

from __future__ import annotations

import argparse
import json
import sys

from qatune.cli.common import UsageError, config_from, make_runtime, split_args


def cmd_eval(ns: argparse.Namespace) -> int:
    from qatune.eval import render
    from qatune.eval.run import ModelSpec, evaluate, tuned_spec

    plain, _ = split_args(ns.args)
    if plain[:1] == ["summarize"]:
        return _eval_summarize(plain[1:])
    if ns.compare and (ns.model or ns.adapter):
        raise UsageError("give either --compare BASE TUNED or --model M [--adapter A], not both")
    config = config_from(ns, extra=[f"model.name_or_path={json.dumps(ns.compare[0])}"] if ns.compare else [])
    if ns.compare:
        specs = [ModelSpec("base", ns.compare[0]), tuned_spec(ns.compare[1], ns.compare[0])]
    else:
        specs = [ModelSpec("model", config.model.name_or_path, ns.adapter)]
    runtime = make_runtime()
    result = evaluate(config, specs, runtime=runtime)
    render.print_summary(result.report, runtime.console)
    runtime.console.print(f"Wrote {result.output_dir}/ ({', '.join(result.report.files)})")
    gate = result.report.gate
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

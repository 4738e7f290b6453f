"""`qatune train` (one process or `--nproc N` under torchrun) and `qatune tune`."""

from __future__ import annotations

import argparse
import os
import sys

from qatune.cli.common import config_from, make_runtime
from qatune.commands import command_line


def cmd_tune(ns: argparse.Namespace) -> int:
    from rich.table import Table

    from qatune.train.tune import tune

    config = config_from(ns)
    runtime = make_runtime()
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

    config = config_from(ns)  # a config error is reported once, before any process starts
    if ns.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(ns.nproc, command_line("train", *ns.args, model=ns.model, data=ns.data))
    runtime = make_runtime()
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
        from qatune.eval.render import print_summary as print_eval

        print_eval(evaluation.report, console)
        console.print(f"Evaluation: {evaluation.output_dir}/eval_report.html")
    console.print(f"Wrote {result.output_dir}/ ({', '.join(result.report.files)})")
    return 0


def _launch(nproc: int, qatune_args: list[str]) -> int:
    """Run `qatune ARGS` as `nproc` processes on this machine under torchrun (gloo on CPU, nccl on GPU)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "qatune", *qatune_args]
    print("launching: " + " ".join(command[2:]), file=sys.stderr)
    return subprocess.call(command)

"""`qatune train` (one process or `--nproc N` under torchrun) and `qatune tune`."""

from __future__ import annotations

import argparse
import os
import sys

from qatune.cli.common import config_from, make_runtime, stage_parser


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
        return _launch(ns.nproc, ["train", *ns.args, *(a for attr, flag in (("model", "--model"), ("data", "--data"))
                                                      for value in _as_list(getattr(ns, attr)) for a in (flag, value))])
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


def add_commands(stages: argparse._SubParsersAction) -> None:
    trn = stage_parser(
        stages, "train", "fine-tune a model on your data (lora, qlora, full, freeze, prefix)",
        "Prepares the data (or reuses it when unchanged), trains, and writes train.output_dir/: "
        "adapter or weights (safetensors), tokenizer, config.yaml, train_report.json, loss_curve.png, "
        "checkpoints and TensorBoard logs. Ctrl-C saves a checkpoint; train.resume=true continues.",
        cmd_train, {"data": "data.sources"})
    trn.add_argument("--data", action="append", metavar="FILE", help="training data file or folder (repeatable)")
    trn.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train with N data-parallel processes on this machine (torchrun; see train.distributed)")

    tun = stage_parser(
        stages, "tune", "search learning rate, LoRA rank/alpha, epochs and warm-up with Optuna",
        "qatune tune CONFIG --trials N [KEY=VALUE]\n\nEach trial trains in tune.output_dir/trial-N and is "
        "pruned when its eval loss trails earlier trials. The study is kept in tune.output_dir/study.db: run the "
        "same command again to resume. Writes best_config.yaml (train it with `qatune train`), "
        "tune_summary.json and optimization_history.png.", cmd_tune, {"trials": "tune.trials"})
    tun.add_argument("--trials", type=int, metavar="N", help="trials the study should hold (tune.trials)")

"""`qatune export`, `chat`, `generate`, `serve` and `studio`: the tuned model put to use."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from qatune.cli.common import UsageError, config_from, make_runtime, split_args


def cmd_export(ns: argparse.Namespace) -> int:
    from qatune.export.run import export, print_summary

    config = config_from(ns)
    runtime = make_runtime()
    result = export(config, runtime)
    print_summary(result.report, runtime.console)
    runtime.console.print(f"Wrote {result.output_dir}/ (report: {result.output_dir}/export_report.json and .md)")
    return 0


def _chat_session(ns: argparse.Namespace, plain: Sequence[str]):
    from qatune.infer.chat import ChatSession

    return ChatSession.load(config_from(ns, plain), make_runtime(), ns.adapter, ns.system)


def cmd_chat(ns: argparse.Namespace) -> int:
    from qatune.infer.chat import chat_loop

    chat_loop(_chat_session(ns, split_args(ns.args)[0]))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    plain, _ = split_args(ns.args)
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
    serve(config_from(ns), make_runtime())
    return 0


def cmd_studio(ns: argparse.Namespace) -> int:
    from qatune.studio.app import serve_studio

    serve_studio(ns.workspace, ns.host, ns.port, ns.token or os.environ.get("QATUNE_STUDIO_TOKEN"))
    return 0

"""`qatune config show | docs`: the resolved config, the config reference."""

from __future__ import annotations

import argparse

from qatune.cli.common import OVERRIDES_HELP, config_from


def cmd_config_show(ns: argparse.Namespace) -> int:
    print(config_from(ns).to_yaml(), end="")
    return 0


def cmd_config_docs(ns: argparse.Namespace) -> int:
    from qatune.config import config_reference

    print(config_reference(), end="")
    return 0


def add_commands(stages: argparse._SubParsersAction) -> None:
    config = stages.add_parser("config", help="show the resolved config or its reference")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_cmds.add_parser("show", help="print the resolved config: FILE plus overrides")
    show.add_argument("args", nargs="*", metavar="[FILE] [KEY=VALUE]", help=OVERRIDES_HELP)
    show.set_defaults(run=cmd_config_show)
    docs = config_cmds.add_parser("docs", help="print the config reference (Markdown) generated from the schema")
    docs.set_defaults(run=cmd_config_docs)

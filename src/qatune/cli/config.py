"""`qatune config show | docs`: the resolved config, the config reference."""

from __future__ import annotations

import argparse

from qatune.cli.common import config_from


def cmd_config_show(ns: argparse.Namespace) -> int:
    print(config_from(ns).to_yaml(), end="")
    return 0


def cmd_config_docs(ns: argparse.Namespace) -> int:
    from qatune.config import config_reference

    print(config_reference(), end="")
    return 0

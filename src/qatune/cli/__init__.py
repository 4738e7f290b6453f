"""The `qatune` command: parses arguments, loads the config, calls a stage, prints. Nothing more.

One module per part of the user's road (config, data, train, evaluate, deploy), each with its commands and
their parsers; common.py holds the one override path they share. Heavy libraries (torch, transformers,
datasets) are imported by the stages, so `qatune --help` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qatune import __version__
from qatune.cli import config, data, deploy, evaluate, train
from qatune.errors import QatuneError

__all__ = ["build_parser", "main", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatune",
        description="Turn an open LLaMA-family model and your Q&A data into a domain assistant.",
    )
    parser.add_argument("--version", action="version", version=f"qatune {__version__}")
    stages = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for part in (config, data, train, evaluate, deploy):  # in this order in `qatune --help`
        part.add_commands(stages)
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

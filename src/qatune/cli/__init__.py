"""The `qatune` command: parses arguments, loads the config, calls a stage, prints. Nothing more.

The parser is built from the command table (`qatune.commands`: names, positionals, flags and the config key
each flag stands for); one module per part of the user's road (config, data, train, evaluate, deploy) holds
the functions the table names, imported when their command runs; common.py holds the one override path they
share. Heavy libraries (torch, transformers, datasets) are imported by the stages, so `qatune --help` and
config errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Literal, get_args, get_origin

from qatune import __version__
from qatune.commands import COMMANDS, GROUPS, Command
from qatune.errors import QatuneError

__all__ = ["build_parser", "main", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qatune",
        description="Turn an open LLaMA-family model and your Q&A data into a domain assistant.",
    )
    parser.add_argument("--version", action="version", version=f"qatune {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS.values():
        *group, word = command.name.split()
        if group and group[0] not in groups:
            group_parser = top.add_parser(group[0], help=GROUPS[group[0]])
            groups[group[0]] = group_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        _add_command(groups[group[0]] if group else top, word, command)
    return parser


def _add_command(commands: argparse._SubParsersAction, word: str, command: Command) -> None:
    preformatted = "\n" in (command.description or "")  # usage lines and paragraphs as written
    parser = commands.add_parser(word, help=command.summary, description=command.description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter if preformatted
                                 else argparse.HelpFormatter)
    for positional in command.positionals:
        parser.add_argument(positional.name, nargs=positional.nargs, metavar=positional.metavar, help=positional.help)
    for flag in command.flags:
        # `%(choices)s` and a metavar: argparse reads the choices only to check a value or print this help
        options = {"help": flag.help + (" (one of %(choices)s)" if flag.choices_of else ""),
                   "choices": _SchemaChoices(flag.choices_of) if flag.choices_of else None,
                   "metavar": flag.metavar, "type": flag.type, "nargs": flag.nargs, "default": flag.default}
        parser.add_argument(flag.name, action=flag.action or "store",
                            **{k: v for k, v in options.items() if v is not None})
    parser.set_defaults(run=command.run, flag_keys=command.flag_keys)


class _SchemaChoices(Sequence[str]):
    """The values the config schema allows at `key` (a Literal, an optional one too), read when argparse first
    needs them, to check a value or print help: building the parser, as every `qatune` call does, imports no
    schema."""

    def __init__(self, key: str) -> None:
        self.key = key

    @cached_property
    def _values(self) -> tuple[str, ...]:
        from qatune.config.schema import field_at

        annotation = field_at(tuple(self.key.split("."))).annotation
        return next(get_args(a) for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)


def _run_function(target: str) -> Callable[[argparse.Namespace], int]:
    """The function a command runs, from its table entry's `module:function`."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


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
        return _run_function(ns.run)(ns)
    except QatuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""What every command shares: `key=value` overrides, the one config path, the runtime."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qatune.errors import QatuneError

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.runtime import Runtime

OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")  # `section.key=value`; a path or a question is not one


class UsageError(QatuneError):
    """Arguments that do not go together."""


def split_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The plain arguments and the `key=value` overrides, in the order given (flags may stand between)."""
    plain = [a for a in args if not OVERRIDE.match(a)]
    return plain, [a for a in args if OVERRIDE.match(a)]


def config_from(ns: argparse.Namespace, plain: Sequence[str] | None = None,
                extra: Sequence[str] = ()) -> "QatuneConfig":
    """The one override path of every command: CONFIG, its `key=value` overrides, then each given flag
    as the key it stands for (`--model M` is model.name_or_path=M, so model.dtype=... stays)."""
    from qatune.config import load_config

    found, overrides = split_args(ns.args)
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


def make_runtime() -> "Runtime":
    """The one device probe of a command, with its console."""
    from rich.console import Console

    from qatune.runtime import Runtime

    return Runtime.detect(Console())

"""Strings from outside (HTTP bodies, URL paths, form fields) checked once, at the edge.

JSON may carry what no UTF-8 text can: a lone UTF-16 surrogate (`"\\ud800"`) reaches Python as a str that
the tokenizer, the file system and the JSON encoder of the answer all refuse with a 500 deep inside. So
the request models take their strings as `Text` (prompts: anything a person could type, controls and
right-to-left marks included, is text) or `Name` (model names, run names, paths, settings: printable
characters only, since a NUL or a bidirectional override there truncates a path or shows a name other
than the one used). A refusal is a ValueError, which pydantic turns into a 4xx naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["Name", "Text", "check_name", "check_text", "printable"]

SURROGATE = re.compile("[\ud800-\udfff]")
NUL = "\x00"
# C0 and C1 controls (a name is one line), and the bidirectional embeddings, overrides, isolates and marks
# (U+061C, U+200E/F, U+202A-E, U+2066-9): invisible, they make a name read as another.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def check_text(value: str) -> str:
    """`value` when it is text a model can read: no lone surrogate (it has no UTF-8) and no NUL (C code
    behind the tokenizers stops there)."""
    if SURROGATE.search(value):
        raise ValueError("invalid Unicode: a lone UTF-16 surrogate (\\ud800-\\udfff) is not a character; "
                         "send the text as UTF-8 or as a surrogate pair")
    if NUL in value:
        raise ValueError("a NUL character (\\u0000) is not text")
    return value


def check_name(value: str) -> str:
    """`value` when it is fit for a name or a path: `check_text`, and no control or bidirectional character."""
    check_text(value)
    found = UNPRINTABLE.search(value)
    if found:
        raise ValueError(f"the invisible character U+{ord(found.group()):04X} is not allowed in a name or a path")
    return value


def printable(text: str) -> str:
    """`text` safe to echo in an answer: a lone surrogate (a dict key that failed its check) as a `\\udXXX` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


Text = Annotated[str, AfterValidator(check_text)]
Name = Annotated[str, AfterValidator(check_name)]

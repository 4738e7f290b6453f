"""The checks every export runs on what it wrote: greedy answers, their comparison, the folder read back.

Shared by the export recipe (merged folder, saved copy, quantized copies) and its GGUF step.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from qatune.config import DecodingConfig

# Logit gap (llama.cpp's pick over the expected token) below which two greedy answers parted at a near
# tie: f16 weights and activations round differently from fp32 by about this much on small models.
NEAR_TIE = 0.5


def answers_of(model: Any, tokenizer: Any, template: Any, questions: list, max_new_tokens: int) -> list[Any]:
    """Greedy answers (text and token ids) to `questions`, as every check of an export makes them."""
    from qatune.infer.generation import generate

    return generate(model, tokenizer, template.source, questions, DecodingConfig(max_new_tokens=max_new_tokens),
                    template.end_of_turn_id)


def answer_texts(model: Any, tokenizer: Any, template: Any, questions: list, max_new_tokens: int) -> list[str]:
    return [a.text for a in answers_of(model, tokenizer, template, questions, max_new_tokens)]


def compare(questions: list[str], expected: list[str], got: list[str]) -> dict[str, Any]:
    same = [e == g for e, g in zip(expected, got)]
    return {"identical": sum(same), "questions": len(same),
            "answers": [{"question": q, "expected": e, "got": g} for q, e, g in zip(questions, expected, got)]}


def read_back(folder: Path, gguf_file: str | None = None) -> Any:
    """The written model as transformers loads it, in fp32 (a GGUF file dequantized): the round-trip check."""
    import torch
    from transformers import AutoModelForCausalLM

    # transformers' GGUF loader draws its own progress bar
    with contextlib.redirect_stderr(io.StringIO()) if gguf_file else contextlib.nullcontext():
        return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)

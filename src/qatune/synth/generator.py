"""The model that writes the data: `config.model` with its chat template, each prompt one user turn,
on the Runtime's device and dtype. A test (or a caller with its own endpoint) passes any function of
the same shape instead."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qatune.config import DecodingConfig, QatuneConfig

if TYPE_CHECKING:
    from rich.console import Console

    from qatune.runtime import Runtime

# User prompts in, the model's outputs out, in the same order.
Generator = Callable[[list[str]], list[str]]


def model_generator(config: QatuneConfig, runtime: "Runtime", decoding: DecodingConfig, batch_size: int) -> Generator:
    """Load `config.model` (tokenizer once, weights in runtime.dtype on runtime.device) and generate with it."""
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import generate
    from qatune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(tokenizer, config.data.template)
    model = load_model(config.model, runtime.dtype(config.model)).to(runtime.device)

    def run(prompts: list[str]) -> list[str]:
        answers = generate(model, tokenizer, template.source, [[{"role": "user", "content": p}] for p in prompts],
                           decoding, template.end_of_turn_id, batch_size)
        return [a.text for a in answers]

    return run


def generate_in_slices(generator: Generator, prompts: list[str], step: int, what: str,
                       console: "Console") -> list[str]:
    """Generate in slices so that a long job shows its progress."""
    outputs: list[str] = []
    for start in range(0, len(prompts), step):
        outputs += generator(prompts[start:start + step])
        console.print(f"generated {len(outputs)}/{len(prompts)} {what}")
    return outputs

"""The teacher that writes the data: `config.model` with its chat template on the Runtime's device and
dtype, or an OpenAI-compatible endpoint (`endpoint.url`, `qatune.endpoint`); each prompt is one user turn.
A test (or a library caller) passes any function of the same shape instead.

Generation goes in slices, and each finished slice is appended to a journal beside the output
(`FILE.partial.jsonl`): a run that is killed or stopped by an endpoint that keeps failing resumes where
it was, skipping every prompt already answered by the same teacher with the same settings. The journal
is removed once the output is written."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.config import DecodingConfig, QatuneConfig

if TYPE_CHECKING:
    from rich.console import Console

    from qatune.endpoint import EndpointStats
    from qatune.runtime import Runtime

# User prompts in, the model's outputs out, in the same order.
Generator = Callable[[list[str]], list[str]]


@dataclass
class Teacher:
    name: str  # as records and reports name it: the model, or `model @ url`
    generate: Generator
    slice_size: int  # prompts generated between two journal writes
    settings: str  # the decoding settings, part of every journal key
    stats: "EndpointStats | None" = None  # requests and retries, for an endpoint

    def report(self) -> dict[str, Any]:
        return {"teacher": self.name, **({"endpoint": self.stats.as_dict()} if self.stats else {})}


def teacher(config: QatuneConfig, runtime: "Runtime", decoding: DecodingConfig, batch_size: int,
            generator: Generator | None = None, system: str | None = None) -> Teacher:
    """The endpoint when `endpoint.url` is set, else `config.model` loaded here; `generator` stands in for either."""
    settings = json.dumps({"decoding": decoding.model_dump(), "system": system}, sort_keys=True)
    endpoint = config.endpoint
    if generator is not None:
        return Teacher(config.model.name_or_path, generator, batch_size * 4, settings)
    if endpoint.url:
        from qatune.endpoint import EndpointStats, chat_completions, describe

        stats = EndpointStats()

        def ask(prompts: list[str]) -> list[str]:
            return chat_completions(endpoint, [_messages(p, system) for p in prompts], decoding, stats)

        return Teacher(describe(endpoint), ask, endpoint.concurrency * 4, settings, stats)
    return Teacher(config.model.name_or_path, model_generator(config, runtime, decoding, batch_size, system),
                   batch_size * 4, settings)


def model_generator(config: QatuneConfig, runtime: "Runtime", decoding: DecodingConfig, batch_size: int,
                    system: str | None = None) -> Generator:
    """Load `config.model` (tokenizer once, weights in runtime.dtype on runtime.device) and generate with it."""
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import generate
    from qatune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    template = resolve_template(tokenizer, config.data.template)
    model = load_model(config.model, runtime.dtype(config.model)).to(runtime.device)

    def run(prompts: list[str]) -> list[str]:
        answers = generate(model, tokenizer, template.source, [_messages(p, system) for p in prompts],
                           decoding, template.end_of_turn_id, batch_size)
        return [a.text for a in answers]

    return run


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def journal_file(output: Path) -> Path:
    """Where the generation of `output` keeps its finished slices until the output is written."""
    return output.with_suffix(".partial.jsonl")


class Journal:
    """The outputs finished so far, one JSON line each, keyed by teacher, settings and prompt."""

    def __init__(self, output: Path) -> None:
        self.path = journal_file(output)
        self.done: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["key"]] = entry["output"]
                except (ValueError, KeyError, TypeError):
                    continue  # the last line of a killed run may be cut short

    @staticmethod
    def keys(teacher: Teacher, prompts: list[str]) -> list[str]:
        """One key per prompt; the n-th repeat of a prompt (augment samples it several times) has its own."""
        seen: dict[str, int] = {}
        keys = []
        for prompt in prompts:
            seen[prompt] = seen.get(prompt, 0) + 1
            text = json.dumps([teacher.name, teacher.settings, prompt, seen[prompt]], ensure_ascii=False)
            keys.append(hashlib.sha256(text.encode("utf-8")).hexdigest())
        return keys

    def add(self, entries: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            for key, output in entries.items():
                file.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.done.update(entries)

def generate_in_slices(teacher: Teacher, prompts: list[str], what: str, console: "Console",
                       journal: Journal) -> tuple[list[str], int]:
    """Every prompt's output, in order, and how many came from the journal of an earlier run."""
    keys = Journal.keys(teacher, prompts)
    todo = [i for i, key in enumerate(keys) if key not in journal.done]
    resumed = len(prompts) - len(todo)
    if resumed:
        console.print(f"resuming: {resumed} of {len(prompts)} {what} were generated by an earlier run "
                      f"({journal.path.name})")
    for start in range(0, len(todo), teacher.slice_size):
        part = todo[start:start + teacher.slice_size]
        outputs = teacher.generate([prompts[i] for i in part])
        journal.add({keys[i]: output for i, output in zip(part, outputs)})
        console.print(f"generated {resumed + start + len(part)}/{len(prompts)} {what}")
    return [journal.done[key] for key in keys], resumed

"""Terminal chat (`qatune chat`) and one-shot answers (`qatune generate`).

The model answers with the chat template it was trained on and stops at its end-of-turn token;
answers stream as they are generated. Decoding comes from `serve.decoding` (temperature 0.7,
top_p 0.9 by default), so chat, generate and the service answer alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qatune.infer.generation import stream

if TYPE_CHECKING:
    from qatune.config import DecodingConfig, QatuneConfig
    from qatune.data.templates import ChatTemplate
    from qatune.runtime import Runtime

COMMANDS = "/reset starts a new conversation, /exit (or Ctrl-D) leaves"


@dataclass
class ChatSession:
    """A model with its template and a conversation history."""

    model: Any
    tokenizer: Any
    template: "ChatTemplate"
    decoding: "DecodingConfig"
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, config: "QatuneConfig", runtime: "Runtime", adapter: str | None = None,
             system: str | None = None) -> "ChatSession":
        from qatune.infer.load import load_for_inference

        model, tokenizer, template = load_for_inference(config.model, runtime, adapter, config.data.template)
        return cls(model, tokenizer, template, config.serve.decoding, system)

    def ask(self, question: str) -> Iterator[str]:
        """Stream the answer to `question`; question and answer join the history once it is complete."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": question})
        pieces: list[str] = []
        for piece in stream(self.model, self.tokenizer, self.template.source, messages, self.decoding,
                            self.template.end_of_turn_id):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": question},
                         {"role": "assistant", "content": "".join(pieces).strip()}]

    def reset(self) -> None:
        self.history.clear()


def chat_loop(session: ChatSession, read: Callable[[str], str] = input,
              write: Callable[[str], None] = lambda text: print(text, end="", flush=True)) -> int:
    """Read questions until /exit or end of input; answers stream to `write`. Returns the number of answers."""
    write(f"Chatting with {session.tokenizer.name_or_path} ({COMMANDS}).\n")
    answers = 0
    while True:
        try:
            line = read("\n>>> ").strip()
        except EOFError:
            write("\n")
            return answers
        if line in ("/exit", "/quit"):
            return answers
        if line == "/reset":
            session.reset()
            write("(new conversation)\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            write(f"unknown command {line}: {COMMANDS}\n")
            continue
        for piece in session.ask(line):
            write(piece)
        write("\n")
        answers += 1

"""`qatune chat` and `qatune generate`: streamed answers equal the batched ones, history, /reset, /exit."""

from __future__ import annotations

import json

import pytest

from qatune.cli import main
from qatune.config import DecodingConfig, load_config
from qatune.infer.chat import ChatSession, chat_loop
from qatune.infer.generation import generate
from qatune.runtime import Runtime


@pytest.fixture(scope="module")
def session(tiny_model_dir) -> ChatSession:
    config = load_config(None, [f"model={json.dumps(str(tiny_model_dir))}", "serve.decoding.temperature=0",
                                "serve.decoding.max_new_tokens=10"])
    return ChatSession.load(config, Runtime.detect(), system="You are a careful assistant.")


def test_streamed_answer_equals_generate_and_history_grows(session):
    question = "感冒了应该多喝水吗？"
    pieces = list(session.ask(question))
    assert len(pieces) >= 2
    messages = [{"role": "system", "content": session.system}, {"role": "user", "content": question}]
    batched = generate(session.model, session.tokenizer, session.template.source, [messages],
                       DecodingConfig(max_new_tokens=10), session.template.end_of_turn_id)[0]
    assert "".join(pieces).strip() == batched.text
    assert [m["role"] for m in session.history] == ["user", "assistant"]

    follow_up = list(session.ask("Why?"))  # the second answer sees the first exchange
    assert follow_up and len(session.history) == 4


def test_chat_loop_commands(session):
    session.reset()
    lines = iter(["Hello", "/reset", "", "/nonsense", "Who wrote Hamlet?", "/exit", "never read"])
    out: list[str] = []
    answers = chat_loop(session, read=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert answers == 2
    assert "(new conversation)" in text and "unknown command /nonsense" in text
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Who wrote Hamlet?"]
    assert next(lines) == "never read"  # /exit stopped reading


def test_chat_loop_ends_at_end_of_input(session):
    def read(prompt):
        raise EOFError

    assert chat_loop(session, read=read, write=lambda text: None) == 0


def test_generate_command(tiny_model_dir, capsys):
    settings = ["serve.decoding.temperature=0", "serve.decoding.max_new_tokens=6"]
    question = "What is the capital of France?"
    assert main(["generate", "--model", str(tiny_model_dir), *settings, question]) == 0
    printed = capsys.readouterr().out
    session = ChatSession.load(load_config(None, [f"model={json.dumps(str(tiny_model_dir))}", *settings]),
                               Runtime.detect())
    assert printed == "".join(session.ask(question)) + "\n"


def test_generate_with_a_missing_adapter_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "hello"])
    assert code == 2
    assert "not an adapter folder" in capsys.readouterr().err

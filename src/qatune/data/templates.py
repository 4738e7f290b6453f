"""Chat templates and tokenization with assistant-only labels.

The conversation is rendered with the model's own Jinja chat template (or a named one for base
models) exactly as inference will render it. Each assistant turn is then located in the rendered
text by rendering the conversation up to that turn with the generation prompt: what follows is the
turn's content and the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`). The
text is cut into prompt and assistant pieces, each piece tokenized on its own, so the labelled
tokens decode to exactly the assistant text plus the end-of-turn token: learning that token is
what makes a fine-tuned model stop instead of running on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qatune.data.records import Conversation
from qatune.errors import TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
NAMED_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (Jinja source, control tokens the tokenizer must know as single tokens)
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% else %}{{ '" + _ALPACA_SYSTEM + "\\n\\n' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'tool' %}{{ '### Input:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
        (),
    ),
    "default": (
        "{% if messages[0]['role'] == 'system' %}{{ 'System: ' + messages[0]['content'] + '\\n' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'tool' %}{{ 'Observation: ' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}",
        (),
    ),
    # Gemma's turn template (google/gemma-3-*-it): the assistant is `model`; Gemma has no system turn, so a
    # system prompt opens the first user turn, and a tool result is a user turn.
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template ready to use: its Jinja source and the text that ends an assistant turn."""

    name: str  # "model" for the model's own, else a key of NAMED_TEMPLATES
    source: str
    end_of_turn: str  # e.g. "<|im_end|>"; learned after every assistant turn
    end_of_turn_id: int


def resolve_template(tokenizer: "PreTrainedTokenizerBase", name: str = "auto") -> ChatTemplate:
    """The model's own template for `auto`, else the named one, checked against the tokenizer."""
    if name == "auto":
        source = tokenizer.chat_template
        if not source or not isinstance(source, str):
            raise TemplateError(
                f"the tokenizer of {tokenizer.name_or_path!r} has no chat template (a base model?)",
                hint=f"set data.template to one of {', '.join(NAMED_TEMPLATES)}",
            )
        label = "model"
    else:
        if name not in NAMED_TEMPLATES:
            raise TemplateError(f"unknown template {name!r}", hint=f"use auto or one of {', '.join(NAMED_TEMPLATES)}")
        source, needed = NAMED_TEMPLATES[name]
        missing = [t for t in needed if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
        if tokenizer.eos_token is None:
            missing.append("an eos_token")
        if missing:
            raise TemplateError(
                f"template {name!r} needs {', '.join(missing)}, which the tokenizer of "
                f"{tokenizer.name_or_path!r} does not have as single tokens",
                hint="pick a template whose tokens this model knows (alpaca and default only need eos)",
            )
        label = name
    end_of_turn = _probe_end_of_turn(tokenizer, source, label)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn.strip())
    return ChatTemplate(label, source, end_of_turn, eot_id)


def render(tokenizer: "PreTrainedTokenizerBase", template: str, messages: list[dict[str, str]],
           add_generation_prompt: bool = False, tools: list | None = None) -> str:
    """Render like `apply_chat_template(tokenize=False)`, with a template given as source."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=template,
        add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map,
    )
    return rendered[0]


def _probe_end_of_turn(tokenizer: "PreTrainedTokenizerBase", source: str, label: str) -> str:
    """What the template writes right after an assistant's text: optional spaces, then a control token."""
    probe = "qatune-probe-answer"
    try:
        text = render(tokenizer, source, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}])
    except Exception as exc:  # a Jinja error inside a third-party template
        raise TemplateError(f"the {label} chat template fails to render: {exc}") from exc
    after = text[text.index(probe) + len(probe):] if probe in text else None
    if after is not None:
        stripped = after.lstrip(" ")
        for token in _control_tokens(tokenizer):
            if stripped.startswith(token):
                return after[: len(after) - len(stripped)] + token
    raise TemplateError(
        f"the {label} chat template does not end an assistant turn with an end-of-turn token "
        f"(after the answer it writes {after!r}); a model trained on it would not learn to stop",
        hint=f"set data.template to one of {', '.join(NAMED_TEMPLATES)}",
    )


def pieces(conv: Conversation, tokenizer: "PreTrainedTokenizerBase", template: ChatTemplate) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces; assistant pieces end with end-of-turn."""
    if conv.is_text:
        return [(conv.messages[0]["content"] + (tokenizer.eos_token or ""), True)]
    messages = conv.messages
    full = render(tokenizer, template.source, messages, tools=conv.tools)
    out: list[tuple[str, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, template.source, messages[:i], add_generation_prompt=True, tools=conv.tools)
        turn = message["content"] + template.end_of_turn
        start = len(prefix)
        if not full.startswith(prefix) or full[start:start + len(turn)] != turn or start < cursor:
            raise TemplateError(
                f"the {template.name} chat template renders assistant turn {i + 1} differently in the full "
                "conversation than when generating it, so assistant tokens cannot be labelled safely "
                f"(record at {conv.location})",
                hint=f"set data.template to one of {', '.join(NAMED_TEMPLATES)}",
            )
        out += [(full[cursor:start], False), (turn, True)]
        cursor = start + len(turn)
    if cursor < len(full):
        out.append((full[cursor:], False))
    return [(text, is_assistant) for text, is_assistant in out if text]


def _control_tokens(tokenizer: "PreTrainedTokenizerBase", special_only: bool = False) -> list[str]:
    """The tokenizer's special and added tokens (`<|im_end|>`, `<|endoftext|>`...), longest first.
    `special_only` leaves out added tokens marked not special: Gemma's are plain text pieces (`\n`, `<b>`,
    whitespace runs) that ordinary answers hold."""
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special or not special_only)
    tokens = set(tokenizer.all_special_tokens) | set(added)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def control_tokens(tokenizer: "PreTrainedTokenizerBase") -> "re.Pattern[str]":
    """A pattern matching any control token of the tokenizer (its special tokens: what fakes markup)."""
    return re.compile("|".join(map(re.escape, _control_tokens(tokenizer, special_only=True))) or "(?!)")


def control_token_in(conv: Conversation, pattern: "re.Pattern[str]") -> str | None:
    """Why a record's text would be read as template markup, or None.

    A control token inside a message would be tokenized as the real token and fake a turn boundary
    (a scraped chat log with `<|im_end|>` left in it), so such a record is dropped and reported.
    """
    for i, message in enumerate(conv.messages):
        found = pattern.search(message["content"])
        if found:
            return f"turn {i + 1} ({message['role']}) contains {found.group()!r}, a control token of the tokenizer"
    return None


def encode_pieces(tokenizer: "PreTrainedTokenizerBase", texts: list[str]) -> list[list[int]]:
    """Tokenize pieces independently, as continuations: each is encoded after a newline that is then
    removed, so SentencePiece tokenizers do not add a word-start space to every piece (transformers'
    own trick in `encode_marked_chat`). Byte-level BPE tokenizers are unaffected."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    out = tokenizer(["\n" + t for t in texts], add_special_tokens=False)["input_ids"]
    # Where the newline merged with the piece's first characters ("\n\n"), encode the piece as is.
    merged = [i for i, ids in enumerate(out) if ids[: len(newline)] != newline]
    plain = tokenizer([texts[i] for i in merged], add_special_tokens=False)["input_ids"] if merged else []
    for i, ids in zip(merged, plain):
        out[i] = ids
    merged_set = set(merged)
    return [ids if i in merged_set else ids[len(newline):] for i, ids in enumerate(out)]


@dataclass(slots=True)
class Sample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def build_samples(parts: list[tuple[list[int], bool]], max_length: int, train_on_prompt: bool,
                  is_text: bool) -> list[Sample]:
    """Assemble pieces into samples no longer than max_length, never without an assistant token.

    A plain text is cut into consecutive windows. A conversation that is too long loses whole turns
    from the end; if even its first answer does not fit, the answer is cut (without its end-of-turn
    token, so the model does not learn to stop mid-sentence), provided at least a quarter of
    max_length is left for it. Otherwise there is no sample and the caller counts it as too long.
    """
    if is_text:
        ids = parts[0][0]
        return [Sample(ids[i:i + max_length], ids[i:i + max_length], len(ids) > max_length)
                for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) >= 2]
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    last_answer_end = 0
    for ids, is_assistant in parts:
        if len(input_ids) + len(ids) > max_length:
            truncated = True
            if is_assistant and last_answer_end == 0:
                room = max_length - len(input_ids)
                if room < max_length // 4:
                    return []
                input_ids += ids[:room]
                labels += ids[:room]
                last_answer_end = len(input_ids)
            break
        input_ids += ids
        labels += ids if (is_assistant or train_on_prompt) else [IGNORE_INDEX] * len(ids)
        if is_assistant:
            last_answer_end = len(input_ids)
    if truncated:
        input_ids, labels = input_ids[:last_answer_end], labels[:last_answer_end]
    return [Sample(input_ids, labels, truncated)] if last_answer_end else []


def tokenize(convs: list[Conversation], tokenizer: "PreTrainedTokenizerBase", template: ChatTemplate,
             max_length: int, train_on_prompt: bool, batch: int = 256) -> Iterator[tuple[Conversation, list[Sample]]]:
    """Yield each conversation with its samples (empty when it cannot fit max_length)."""
    for start in range(0, len(convs), batch):
        chunk = convs[start:start + batch]
        cut = [pieces(conv, tokenizer, template) for conv in chunk]
        encoded = iter(encode_pieces(tokenizer, [text for conv_pieces in cut for text, _ in conv_pieces]))
        for conv, conv_pieces in zip(chunk, cut):
            parts = [(next(encoded), is_assistant) for _, is_assistant in conv_pieces]
            yield conv, build_samples(parts, max_length, train_on_prompt, conv.is_text)


def template_metadata(template: ChatTemplate) -> dict[str, Any]:
    return {"name": template.name, "end_of_turn": template.end_of_turn, "end_of_turn_id": template.end_of_turn_id,
            "renders_tools": "tools" in template.source}

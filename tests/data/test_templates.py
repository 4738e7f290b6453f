"""Labels cover exactly the assistant text plus the end-of-turn token, with the default model's template."""

from __future__ import annotations

import pytest

from qatune.data.records import Conversation
from qatune.data.templates import IGNORE_INDEX, resolve_template, tokenize
from qatune.errors import Location, TemplateError


def _conv(*turns: tuple[str, str]) -> Conversation:
    return Conversation([{"role": r, "content": c} for r, c in turns], "test", Location("mem", 1))


def _labelled_runs(sample, tokenizer) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def _samples(conv, tokenizer, template="auto", max_length=1024, train_on_prompt=False):
    tmpl = resolve_template(tokenizer, template)
    return next(tokenize([conv], tokenizer, tmpl, max_length, train_on_prompt))[1]


def test_default_model_template_ends_turns_with_im_end(tokenizer) -> None:
    template = resolve_template(tokenizer)
    assert template.name == "model" and template.end_of_turn == "<|im_end|>"
    assert template.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_single_turn_labels_decode_to_answer_plus_end_of_turn(tokenizer) -> None:
    conv = _conv(("user", "孩子发烧39度怎么办？"), ("assistant", "先物理降温，多喝水；持续高烧请及时就医。"))
    [sample] = _samples(conv, tokenizer)
    assert _labelled_runs(sample, tokenizer) == ["先物理降温，多喝水；持续高烧请及时就医。<|im_end|>"]
    # The whole sample is exactly what the model's template renders, nothing padded.
    rendered = tokenizer.apply_chat_template(conv.messages, tokenize=False)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == rendered
    # The prompt part is the same token sequence inference will feed the model.
    prompt_ids = tokenizer.apply_chat_template(conv.messages[:1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    assert sample.input_ids[: len(prompt_ids)] == list(prompt_ids)
    assert all(label == IGNORE_INDEX for label in sample.labels[: len(prompt_ids)])


def test_multi_turn_with_system_labels_every_assistant_turn(tokenizer) -> None:
    conv = _conv(("system", "You are Northwind's HR assistant."),
                 ("user", "How many days of annual leave do I get?"), ("assistant", "15 working days a year."),
                 ("user", "能结转吗？"), ("assistant", "最多结转5天，须在次年3月31日前用完。"))
    [sample] = _samples(conv, tokenizer)
    assert _labelled_runs(sample, tokenizer) == ["15 working days a year.<|im_end|>",
                                                 "最多结转5天，须在次年3月31日前用完。<|im_end|>"]


def test_train_on_prompt_labels_everything(tokenizer) -> None:
    conv = _conv(("user", "Is the VPN required at home?"), ("assistant", "Yes, for every internal system."))
    [sample] = _samples(conv, tokenizer, train_on_prompt=True)
    assert sample.labels == sample.input_ids


@pytest.mark.parametrize("name, end", [("chatml", "<|im_end|>"), ("alpaca", "<|im_end|>"), ("default", "<|im_end|>")])
def test_named_templates_for_base_models(tokenizer, name: str, end: str) -> None:
    conv = _conv(("user", "What is a normal resting heart rate?"), ("assistant", "About 60 to 100 beats per minute."))
    [sample] = _samples(conv, tokenizer, template=name)
    assert _labelled_runs(sample, tokenizer) == [f"About 60 to 100 beats per minute.{end}"]  # eos is <|im_end|> here


def test_template_with_unknown_tokens_is_refused(tokenizer) -> None:
    with pytest.raises(TemplateError, match=r"template 'llama3' needs <\|start_header_id\|>"):
        resolve_template(tokenizer, "llama3")


def test_template_without_end_of_turn_is_refused(tokenizer) -> None:
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="would not learn to stop"):
        resolve_template(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template"):
        resolve_template(tokenizer)


def test_truncation_never_leaves_a_sample_without_assistant_tokens(tokenizer) -> None:
    long_answer = "多喝水，注意休息。" * 60
    multi = _conv(("user", "头疼怎么办？"), ("assistant", "注意休息。"), ("user", "还有呢？"), ("assistant", long_answer))
    [sample] = _samples(multi, tokenizer, max_length=64)  # the second, long exchange is dropped whole
    assert len(sample.input_ids) <= 64 and sample.truncated
    assert _labelled_runs(sample, tokenizer) == ["注意休息。<|im_end|>"]

    single = _conv(("user", "头疼怎么办？"), ("assistant", long_answer))
    [sample] = _samples(single, tokenizer, max_length=64)  # the answer itself is cut, without end-of-turn
    runs = _labelled_runs(sample, tokenizer)
    assert len(sample.input_ids) == 64 and len(runs) == 1 and "<|im_end|>" not in runs[0]
    assert long_answer.startswith(runs[0].rstrip("\ufffd"))

    long_prompt = _conv(("user", "请解释：" + "血压" * 200), ("assistant", "好的。"))
    assert _samples(long_prompt, tokenizer, max_length=64) == []  # counted as too_long by the caller


def test_text_records_are_cut_into_windows(tokenizer) -> None:
    conv = Conversation([{"role": "text", "content": "高血压患者应低盐饮食。" * 40}], "t", Location("mem", 1))
    samples = _samples(conv, tokenizer, max_length=64)
    assert len(samples) > 1 and all(len(s.input_ids) <= 64 and s.labels == s.input_ids for s in samples)
    assert samples[-1].input_ids[-1] == tokenizer.eos_token_id

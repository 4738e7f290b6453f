"""Preference data through the data stage: LLaMA-Factory ranking sets (alpaca and sharegpt, registered with
`ranking: true`), `{question|prompt|messages, chosen, rejected}` with text or message answers, KTO's
`{messages, label}`; cleaned and counted like SFT data, with file:line:field errors."""

from __future__ import annotations

import json

import pytest

from qatune.config import DataConfig, SourceConfig
from qatune.data.prepare import prepare
from qatune.data.sources import load
from qatune.errors import DataError
from tests.conftest import tiny_config, write_jsonl

PAIRS = [
    {"question": "What is the capital of France?", "chosen": "Paris is the capital of France.",
     "rejected": "I am not sure about that."},
    {"prompt": [{"role": "system", "content": "回答要简洁。"}, {"role": "user", "content": "什么是高血压？"}],
     "chosen": [{"role": "assistant", "content": "高血压是指动脉血压持续高于正常范围。"}], "rejected": "不知道。不清楚。"},
    {"messages": [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Who asks?"},
                  {"role": "user", "content": "I do: who wrote Hamlet?"}],
     "chosen": "William Shakespeare wrote Hamlet.", "rejected": "Charles Dickens wrote Hamlet."},
    {"conversations": [{"from": "human", "value": "蜘蛛有几条腿？"}], "chosen": {"from": "gpt", "value": "蜘蛛有八条腿。"},
     "rejected": {"from": "gpt", "value": "蜘蛛有六条腿。"}},
    {"question": "What colour is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is blue."},  # identical
]


def loaded(path, **source) -> list:
    result = load(DataConfig(sources=[SourceConfig(path=str(path), **source)], clean={"near_dedup": False}))
    return result.domain, result.log


def test_every_pair_shape_becomes_prompt_chosen_rejected_and_identical_pairs_are_counted(tmp_path) -> None:
    convs, log = loaded(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    assert [(c.messages[-1]["content"], c.rejected[0]["content"]) for c in convs] == [
        (p["chosen"] if isinstance(p["chosen"], str) else
         (p["chosen"][0] if isinstance(p["chosen"], list) else {"content": p["chosen"]["value"]})["content"],
         p["rejected"] if isinstance(p["rejected"], str) else p["rejected"]["value"]) for p in PAIRS[:4]]
    assert convs[1].messages[0] == {"role": "system", "content": "回答要简洁。"}
    assert [m["role"] for m in convs[2].messages] == ["user", "assistant", "user", "assistant"]
    assert log.by_reason() == {"identical_pair": 1}
    assert log.drops[0].location.endswith("pairs.jsonl, line 5")


def test_llamafactory_ranking_and_kto_sets_from_dataset_info(tmp_path) -> None:
    (tmp_path / "dpo_zh.json").write_text(json.dumps([
        {"instruction": "解释高血压", "input": "用一句话", "chosen": "高血压是血压持续偏高。", "rejected": "就是头疼。"},
    ], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "dpo_sg.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "How many legs does a spider have?"}],
         "chosen": {"from": "gpt", "value": "A spider has eight legs."},
         "rejected": {"from": "gpt", "value": "Spiders have six legs."}},
    ]), encoding="utf-8")
    (tmp_path / "kto.json").write_text(json.dumps([
        {"messages": [{"content": "感冒了应该多喝水吗？", "role": "user"}, {"content": "是的，多喝水。", "role": "assistant"}],
         "label": True},
        {"messages": [{"content": "Is the sun cold?", "role": "user"}, {"content": "Yes, very cold.", "role": "assistant"}],
         "label": False},
    ], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "dpo_zh": {"file_name": "dpo_zh.json", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
        "dpo_sg": {"file_name": "dpo_sg.json", "formatting": "sharegpt", "ranking": True,
                   "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "kto": {"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    }), encoding="utf-8")
    convs, log = loaded(tmp_path, dataset="dpo_zh,dpo_sg")
    assert len(log) == 0
    assert convs[0].messages == [{"role": "user", "content": "解释高血压\n用一句话"},
                                 {"role": "assistant", "content": "高血压是血压持续偏高。"}]
    assert convs[0].rejected == [{"role": "assistant", "content": "就是头疼。"}]
    assert convs[1].rejected == [{"role": "assistant", "content": "Spiders have six legs."}]
    kto, _ = loaded(tmp_path, dataset="kto")
    assert [(c.answer, c.label) for c in kto] == [("是的，多喝水。", True), ("Yes, very cold.", False)]


def test_bad_pairs_name_file_line_and_field(tmp_path) -> None:
    missing = write_jsonl(tmp_path / "a.jsonl", [PAIRS[0], {"question": "Why?", "chosen": "Because it is so."}])
    with pytest.raises(DataError, match=r"a.jsonl, line 2, field 'rejected': required field is missing"):
        loaded(missing)
    wrong_role = write_jsonl(tmp_path / "b.jsonl", [{"question": "Why?", "chosen": [{"role": "user", "content": "x y"}],
                                                     "rejected": "Because."}])
    with pytest.raises(DataError, match=r"b.jsonl, line 1, field 'chosen\[0\]': expected the assistant's answer"):
        loaded(wrong_role)
    label = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Is it?"},
                                                             {"role": "assistant", "content": "It is."}],
                                                "label": "maybe"}])
    with pytest.raises(DataError, match=r"c.jsonl, line 1, field 'label': expected a boolean label"):
        loaded(label)


def test_preference_rows_for_each_stage_and_mismatches_refused(tmp_path, tiny_model_dir) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    dpo = prepare(tiny_config(tmp_path / "dpo", tiny_model_dir, pairs, "train.stage=dpo", "data.val_size=0"))
    assert dpo.report["drops"] == {"identical_pair": 1}
    row = dpo.train[1]
    assert row["prompt"][-1] == {"role": "user", "content": "什么是高血压？"}
    assert row["chosen"] == [{"role": "assistant", "content": "高血压是指动脉血压持续高于正常范围。"}]
    assert row["rejected"] == [{"role": "assistant", "content": "不知道。不清楚。"}]

    kto = prepare(tiny_config(tmp_path / "kto", tiny_model_dir, pairs, "train.stage=kto", "data.val_size=0"))
    assert kto.train["label"] == [True, False] * 4  # each pair: its chosen desirable, its rejected not
    assert [m[-1]["content"] for m in kto.train["completion"][:2]] == ["Paris is the capital of France.",
                                                                       "I am not sure about that."]

    tight = prepare(tiny_config(tmp_path / "tight", tiny_model_dir, pairs, "train.stage=dpo", "data.val_size=0",
                                "data.max_length=64"))  # the multi-turn prompt: 55 tokens, over 64 - 64 // 4
    assert tight.report["drops"] == {"identical_pair": 1, "too_long": 1}
    assert tight.report["drop_examples"]["too_long"][0]["location"].endswith("pairs.jsonl, line 3")

    with pytest.raises(DataError, match=r"pairs.jsonl, line 1: train.stage=sft trains on conversations.*pair"):
        prepare(tiny_config(tmp_path / "sft", tiny_model_dir, pairs, "data.val_size=0"))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is it?", "answer": "A test record."}])
    with pytest.raises(DataError, match=r"qa.jsonl, line 1: train.stage=dpo needs chosen and rejected answers"):
        prepare(tiny_config(tmp_path / "qa", tiny_model_dir, qa, "train.stage=dpo", "data.val_size=0"))

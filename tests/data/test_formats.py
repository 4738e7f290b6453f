"""Every format becomes the same Conversation; bad records name their field; the LF registry works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qatune.config import DataConfig, SourceConfig
from qatune.data.sources import check, load
from qatune.errors import DataError, DataFormatError, MissingColumnError
from tests.conftest import write_jsonl

USER_ASSISTANT = [{"role": "user", "content": "头疼怎么办？"}, {"role": "assistant", "content": "多休息，多喝水。"}]


def _load(path: Path, **source: object) -> list[list[dict]]:
    data = DataConfig(sources=[SourceConfig(path=str(path), **source)], val_size=0)
    data.clean.near_dedup = False
    return [c.messages for c in load(data).domain]


@pytest.mark.parametrize(
    "record, extra",
    [
        ({"question": "头疼怎么办？", "answer": "多休息，多喝水。"}, {}),
        ({"instruction": "头疼怎么办？", "input": "", "output": "多休息，多喝水。"}, {}),
        ({"input": "头疼怎么办？", "target": "多休息，多喝水。"}, {}),
        ({"conversations": [{"from": "human", "value": "头疼怎么办？"}, {"from": "gpt", "value": "多休息，多喝水。"}]}, {}),
        ({"messages": USER_ASSISTANT}, {}),
        ({"ask": "头疼怎么办？", "reply": "多休息，多喝水。"}, {"columns": {"question": "ask", "answer": "reply"}}),
        ({"dialog": [{"speaker": "patient", "text": "头疼怎么办？"}, {"speaker": "doctor", "text": "多休息，多喝水。"}]},
         {"format": "sharegpt", "columns": {"conversations": "dialog"},
          "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "patient", "assistant_tag": "doctor"}}),
    ],
    ids=["qa", "alpaca", "input_target", "sharegpt", "messages", "qa-columns", "sharegpt-tags"],
)
def test_each_format_becomes_the_same_conversation(tmp_path: Path, record: dict, extra: dict) -> None:
    assert _load(write_jsonl(tmp_path / "d.jsonl", [record]), **extra) == [USER_ASSISTANT]


def test_alpaca_system_history_and_input(tmp_path: Path) -> None:
    record = {"instruction": "Summarise", "input": "the leave policy", "output": "15 days a year.",
              "system": "You are HR.", "history": [["Hi", "Hello, how can I help?"]]}
    assert _load(write_jsonl(tmp_path / "a.jsonl", [record])) == [[
        {"role": "system", "content": "You are HR."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Summarise\nthe leave policy"}, {"role": "assistant", "content": "15 days a year."},
    ]]


def test_text_format_for_continued_pretraining(tmp_path: Path) -> None:
    assert _load(write_jsonl(tmp_path / "t.jsonl", [{"text": "高血压患者应低盐饮食。"}])) == [
        [{"role": "text", "content": "高血压患者应低盐饮食。"}]]


def test_sharegpt_tool_roles_map_to_assistant_and_tool(tmp_path: Path) -> None:
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": '{"name": "weather"}'},
        {"from": "observation", "value": '{"temp": 20}'}, {"from": "gpt", "value": "It is 20 degrees."}],
        "tools": '[{"name": "weather", "parameters": {}}]'}
    data = DataConfig(sources=[str(write_jsonl(tmp_path / "s.jsonl", [record]))], val_size=0)
    conv = load(data).domain[0]
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.tools == [{"name": "weather", "parameters": {}}]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q?", "answr": "a"}, r"cannot tell the format from the fields \['answr', 'question'\]"),
        ({"question": "What now?", "answer": 42}, r"line 1, field 'answer': expected a string, got int 42"),
        ({"question": "What now?"}, "cannot tell the format"),
        ({"messages": [{"role": "user", "content": "hi there"}]}, "the last turn must be the assistant's"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "turn 2 is 'user'"),
        ({"conversations": [{"from": "patient", "value": "hi"}]}, r"field 'conversations\[0\].from': unknown role 'patient'"),
        ({"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "x"}]},
         r"field 'messages\[0\].content': expected a string, got list"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"field 'history\[0\]'"),
    ],
    ids=["unknown-keys", "mistyped", "missing", "ends-with-user", "no-alternation", "bad-role", "content-list", "bad-history"],
)
def test_bad_record_names_file_line_and_field(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message) as info:
        _load(path)
    assert str(path) in str(info.value)


def test_missing_field_in_later_record(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q one", "answer": "a one"}, {"question": "q two"}])
    with pytest.raises(DataFormatError, match=r"line 2, field 'answer': required field is missing") as info:
        _load(path)
    assert "on_error=skip" in str(info.value)  # the fix is named


def test_csv_without_the_needed_column_fails_for_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,reply\n发烧怎么办,多喝水\n")
    with pytest.raises(MissingColumnError, match=r"d.csv: no column 'answer' needed by format 'qa'; the file has \['question', 'reply'\]"):
        _load(path, format="qa")
    assert _load(path, columns={"answer": "reply"}) == [[{"role": "user", "content": "发烧怎么办"},
                                                          {"role": "assistant", "content": "多喝水"}]]


def test_on_error_skip_counts_each_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "good one", "answer": "fine answer"}) + "\n{broken\n"
                    + json.dumps({"question": "no answer"}) + "\n" + json.dumps({"question": "x y", "answer": 3}) + "\n")
    result = check([SourceConfig(path=str(path))], DataConfig())
    assert (result.records, result.kept, result.errors) == (4, 1, 3)
    assert [d.location.rsplit(", ", 1)[-1] for d in result.log.drops] == ["line 2", "line 3", "line 4"]


# -- LLaMA-Factory registry --------------------------------------------------------------------

def test_llamafactory_demo_registry_loads(shared_data: Path) -> None:
    registry = shared_data / "llamafactory_demo"
    data = DataConfig(sources=[{"path": str(registry), "dataset": "alpaca_en_demo,alpaca_zh_demo,identity,glaive_toolcall_en_demo"}],
                      val_size=0)
    data.clean.near_dedup = False
    data.clean.dedup = False
    data.clean.min_question_length = data.clean.min_answer_length = 1
    loaded = load(data)
    read = {s.name: s.read for s in loaded.sources}
    assert read == {"alpaca_en_demo": 999, "alpaca_zh_demo": 1000, "identity": 91, "glaive_toolcall_en_demo": 300}
    assert len(loaded.log) == 0, loaded.log.drops[:3]
    assert len(loaded.domain) == 2390
    assert {s.name: sorted(s.formats) for s in loaded.sources}["glaive_toolcall_en_demo"] == ["sharegpt"]


def test_registry_errors_say_why(shared_data: Path) -> None:
    registry = shared_data / "llamafactory_demo"
    with pytest.raises(DataError, match="did you mean alpaca_en_demo"):
        load(DataConfig(sources=[{"path": str(registry), "dataset": "alpaca_en_dem"}]))
    with pytest.raises(DataError, match="only on a hub"):
        load(DataConfig(sources=[{"path": str(registry), "dataset": "alpaca_gpt4_en"}]))
    with pytest.raises(DataError, match="no dataset_info.json"):
        load(DataConfig(sources=[{"path": str(shared_data / "zh_medical_qa"), "dataset": "x"}]))


def test_shared_medical_sets_load_with_zero_errors(shared_data: Path) -> None:
    for name in ("zh_medical_qa", "en_medical_qa"):
        data = DataConfig(sources=[str(shared_data / name)], val_size=0, on_error="raise")
        data.clean.near_dedup = False
        loaded = load(data)
        assert sum(s.read for s in loaded.sources) == 3300
        assert not [d for d in loaded.log.drops if d.reason == "malformed"]
        assert len(loaded.domain) == 3300 - len(loaded.log)

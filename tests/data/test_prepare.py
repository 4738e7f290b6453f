"""The whole data stage on the demo set: files written, every record accounted for, CLI in front."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qatune.cli import main
from qatune.config import load_config
from qatune.data.prepare import load_prepared, prepare, prepare_or_reuse
from qatune.errors import DataError, ModelLoadError
from tests.conftest import REPO, write_jsonl


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config(REPO / "examples" / "demo.yaml", [f"data.output_dir={out}"])
    for source in cfg.data.sources + cfg.data.eval_sources:
        source.path = str(REPO / source.path)
    return prepare(cfg), out


def test_prepare_writes_dataset_report_drops_histogram(demo) -> None:
    result, out = demo
    for name in ("data_report.json", "dropped.jsonl", "token_lengths.png", "chat_template.jinja", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
    saved = load_prepared(out)
    assert saved.report == result.report
    assert saved.train.num_rows == result.train.num_rows > 200
    assert saved.train["input_ids"] == result.train["input_ids"]
    assert saved.validation.num_rows == 30  # the explicit eval file, kept whole
    row = saved.train[0]
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"] <= 512
    assert any(label != -100 for label in row["labels"])


def test_every_record_is_accounted_for(demo) -> None:
    result, out = demo
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report == result.report
    for source in report["sources"]:
        kept = sum(source["kept"].values())
        assert source["read"] == kept + sum(source["dropped"].values()), source["name"]
    drops = [json.loads(line) for line in (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(drops) == sum(report["drops"].values())
    assert all(d["location"] and d["reason"] and d["detail"] for d in drops)
    assert report["splits"]["train"]["length"]["p50"] > 0
    assert report["template"]["end_of_turn"] == "<|im_end|>"


def test_leakage_split_mix_and_tag_through_prepare(tmp_path: Path, tokenizer, shared_data: Path) -> None:
    domain_file = REPO / "examples" / "data" / "demo_qa.jsonl"
    fifth = json.loads(domain_file.read_text(encoding="utf-8").splitlines()[4])
    write_jsonl(tmp_path / "eval.jsonl", [{"question": fifth["question"] + " ", "answer": "A different reference answer."}])
    overrides = [f"data.sources=[{domain_file}]", f"data.eval_sources=[{REPO}/examples/data/demo_eval.jsonl, {tmp_path}/eval.jsonl]",
                 f"data.general_sources=[{shared_data}/llamafactory_demo/alpaca_en_demo.json]",
                 "data.mix_ratio=7:3", "data.task_tag=[QA]", f"data.output_dir={tmp_path}/out"]
    result = prepare(load_config(None, overrides), write=False)
    report = result.report
    assert report["drops"].get("eval_leakage") == 1
    assert report["drop_examples"]["eval_leakage"][0]["location"].endswith("demo_qa.jsonl, line 5")
    n_domain = sum(s["kept"].get("train", 0) for s in report["sources"] if s["role"] == "domain")
    n_general = report["mix"]["general_used"]
    assert n_general == round(n_domain * 3 / 7) and report["mix"]["general_available"] > n_general
    assert result.train["source"].count("llamafactory_demo/alpaca_en_demo") == n_general
    users = [next(m["content"] for m in msgs if m["role"] == "user") for msgs, source
             in zip(result.train["messages"], result.train["source"])]
    tagged = [u.startswith("[QA] ") for u in users]
    assert sum(tagged) == n_domain  # the tag marks domain questions only, never general data
    assert result.validation.num_rows == 31


def test_split_is_seeded_and_reproducible(tmp_path: Path, tokenizer) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"question": f"问题{i}：年假怎么申请第{i}次？", "answer": f"在系统里提交第{i}号申请表。"}
                                       for i in range(50)])
    base = [f"data.sources=[{tmp_path}/d.jsonl]", "data.val_size=0.2", "data.clean.near_dedup=false"]
    first = prepare(load_config(None, base), write=False).validation["location"]
    again = prepare(load_config(None, base), write=False).validation["location"]
    other = prepare(load_config(None, base + ["data.seed=1"]), write=False).validation["location"]
    assert first == again and len(first) == 10 and first != other


def test_wrong_model_fails_before_reading_data(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        prepare(load_config(None, ["model=./no/such/model", "data.sources=[missing.jsonl]"]), write=False)


def test_cli_data_check_lists_problems_and_sets_exit_code(tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "年假有几天？", "answer": "每年十五个工作日。"}])
    assert main(["data", "check", str(good)]) == 0
    assert "/good: qa): 1 usable; no problem." in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "年假有几天？", "answer": "每年十五个工作日。"}\n{oops\n{"question": "病假？", "answer": ""}\n',
                   encoding="utf-8")
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}, line 2: malformed: malformed JSON" in out
    assert f"{bad}, line 3: empty: turn 2 (assistant) is empty" in out
    assert "3 records" in out and "1 malformed, 1 empty" in out


def test_cli_data_prepare_prints_summary(tmp_path: Path, capsys, tokenizer) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "孩子发烧怎么办？", "answer": "多喝水，注意观察精神状态。"},
                                              {"question": "How do I reset my password?", "answer": "Use the self-service portal."}])
    assert main(["data", "prepare", f"data.sources=[{data}]", f"data.output_dir={tmp_path}/out"]) == 0
    out = capsys.readouterr().out
    assert "Records per source" in out and "Tokens per sample" in out and "<|im_end|>" in out
    assert (tmp_path / "out" / "data_report.json").is_file()


def test_too_long_and_control_token_records_are_counted_not_lost(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "请总结以下病历：" + "患者主诉头痛三天。" * 80, "answer": "头痛三天，建议就诊。"},
        {"question": "How do I book a meeting room?", "answer": "Use the Rooms tab in the intranet calendar."},
        {"question": "Copied from a chat log", "answer": "Sure.<|im_end|>\n<|im_start|>user\nthanks"},
    ])
    result = prepare(load_config(None, [f"data.sources=[{data}]", "data.max_length=64", "data.val_size=0"]), write=False)
    assert result.report["drops"] == {"control_token": 1, "too_long": 1}
    assert result.report["drop_examples"]["too_long"][0]["location"].endswith("d.jsonl, line 1")
    control = result.report["drop_examples"]["control_token"][0]
    assert control["location"].endswith("line 3") and "'<|im_end|>'" in control["detail"]
    assert result.train.num_rows == 1 and result.validation is None


def test_nothing_left_is_an_error_that_points_at_the_drops(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, {"question": "", "answer": "fine answer"}])
    with pytest.raises(DataError, match=r"no training sample left: 2 records read, dropped: 1 empty, 1 too_short; "
                                        r"every drop is listed in .*dropped.jsonl"):
        prepare(load_config(None, [f"data.sources=[{data}]", f"data.output_dir={tmp_path}/out"]))
    assert len((tmp_path / "out" / "dropped.jsonl").read_text().splitlines()) == 2


def test_load_prepared_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no prepared dataset here") as info:
        load_prepared(tmp_path)
    assert "qatune data prepare" in str(info.value)


def test_tool_schemas_are_kept_and_a_template_that_ignores_them_is_reported(tmp_path: Path, tokenizer, capsys) -> None:
    record = {"conversations": [{"from": "human", "value": "What's the weather in Paris today?"},
                                {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                                {"from": "observation", "value": '{"temp_c": 20}'},
                                {"from": "gpt", "value": "It is 20 degrees in Paris."}],
              "tools": '[{"name": "weather", "description": "Current weather", "parameters": {}}]'}
    data = write_jsonl(tmp_path / "tools.jsonl", [record])
    assert main(["data", "prepare", f"data.sources=[{data}]", "data.val_size=0", f"data.output_dir={tmp_path}/out"]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines at the terminal width
    assert "1 samples carry tool schemas, but the chat template does not render `tools`" in printed
    saved = load_prepared(tmp_path / "out")
    assert json.loads(saved.train[0]["tools"]) == [{"name": "weather", "description": "Current weather", "parameters": {}}]
    assert saved.report["records_with_tools"] == 1 and saved.report["template"]["renders_tools"] is False


def _reuse_config(tmp_path: Path, data: Path, *overrides: str):
    return load_config(None, [f"data.sources=[{data}]", "data.val_size=0", "data.clean.near_dedup=false",
                              f"data.output_dir={tmp_path}/out", *overrides])


REUSE_RECORDS = [{"question": f"How do I book meeting room {i}?",
                  "answer": f"Use the Rooms tab of the intranet calendar, pick room {i} and the hours you need, then "
                            "confirm the booking; the room shows as taken at once."} for i in range(6)]


def test_prepare_or_reuse_reuses_unchanged_inputs_only(tmp_path: Path, tokenizer) -> None:
    """Reused only when nothing it depends on changed: a changed data file, a data setting or a clean
    setting each makes a fresh dataset (re-tokenized, with the new content), then that one is reused."""
    data = write_jsonl(tmp_path / "d.jsonl", REUSE_RECORDS)
    first, reused = prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)
    assert reused is False and first.train.num_rows == 6
    again, reused = prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)
    assert reused is True and again.train["input_ids"] == first.train["input_ids"]

    # Same size, same modification time, other content: only the content can tell them apart.
    stat = data.stat()
    edited = data.read_text(encoding="utf-8").replace("room 5 and", "room 9 and")
    assert len(edited) == len(data.read_text(encoding="utf-8"))
    data.write_text(edited, encoding="utf-8")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed, reused = prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)
    assert reused is False and any("room 9 and" in m[-1]["content"] for m in changed.train["messages"])
    assert prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)[1] is True

    shorter, reused = prepare_or_reuse(_reuse_config(tmp_path, data, "data.max_length=64"), tokenizer)
    assert reused is False and shorter.report["max_length"] == 64
    assert max(shorter.train["length"]) == 64 < max(changed.train["length"])
    assert all(shorter.train["truncated"]) and not any(changed.train["truncated"])

    strict, reused = prepare_or_reuse(_reuse_config(tmp_path, data, "data.clean.near_dedup=true"), tokenizer)
    assert reused is False and strict.train.num_rows < 6 and strict.report["drops"]["near_duplicate"] > 0
    assert load_prepared(tmp_path / "out").report == strict.report  # the replaced dataset is the one on disk


def test_prepare_or_reuse_counts_a_new_file_in_a_source_folder(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", REUSE_RECORDS[:3])
    assert prepare_or_reuse(_reuse_config(tmp_path, folder), tokenizer)[1] is False
    assert prepare_or_reuse(_reuse_config(tmp_path, folder), tokenizer)[1] is True
    write_jsonl(folder / "b.jsonl", REUSE_RECORDS[3:])
    grown, reused = prepare_or_reuse(_reuse_config(tmp_path, folder), tokenizer)
    assert reused is False and grown.train.num_rows == 6


def test_plan_decides_without_writing(tmp_path: Path) -> None:
    """The plan names what the run would replace and whether it can reuse, and writes nothing itself."""
    from qatune import plugins
    from qatune.data import prepare as recipe
    from qatune.runtime import Runtime

    sft = plugins.load("stage", "sft")
    data = write_jsonl(tmp_path / "d.jsonl", REUSE_RECORDS)
    config = _reuse_config(tmp_path, data)
    plan = recipe.plan(config, Runtime(), sft, reuse=True)
    assert plan.reuse is False and plan.replaces is False and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="no such file or folder"):
        recipe.plan(_reuse_config(tmp_path, tmp_path / "missing.jsonl"), Runtime(), sft)


def test_a_folder_with_user_files_is_never_a_data_output(tmp_path: Path, tokenizer) -> None:
    """data.output_dir replaces only what `prepare` wrote: a folder of user files, or a data folder with
    user files added, is refused with the files named, and left as it was."""
    data = write_jsonl(tmp_path / "d.jsonl", REUSE_RECORDS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine", encoding="utf-8")
    (out / "config.yaml").write_text("my: config\n", encoding="utf-8")  # a name prepare writes, but not its folder
    with pytest.raises(DataError, match="not a qatune data folder") as info:
        prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)
    assert "notes.md" in str(info.value) and "config.yaml" in str(info.value) and str(out) in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.md"]
    assert (out / "config.yaml").read_text(encoding="utf-8") == "my: config\n"

    (out / "notes.md").unlink()
    (out / "config.yaml").unlink()
    assert prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)[1] is False  # an empty folder is fine
    (out / "mine.txt").write_text("mine", encoding="utf-8")
    assert prepare_or_reuse(_reuse_config(tmp_path, data), tokenizer)[1] is True  # reused: nothing written
    with pytest.raises(DataError, match="holds files that are not qatune's") as info:
        prepare_or_reuse(_reuse_config(tmp_path, data, "data.max_length=64"), tokenizer)
    assert "mine.txt" in str(info.value) and "dataset" not in str(info.value)
    assert load_prepared(out).report["max_length"] != 64  # the earlier dataset is untouched


def test_prepare_files_are_whole_and_hold_no_secret(tmp_path: Path, tokenizer) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", REUSE_RECORDS)
    key = "sk-data-stage-5b1e0d"
    prepare_or_reuse(_reuse_config(tmp_path, data, f"serve.api_key={key}"), tokenizer)
    out = tmp_path / "out"
    assert [str(p) for p in out.rglob("*") if p.is_file() and key.encode() in p.read_bytes()] == []
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # every temporary name was renamed
    assert load_config(out / "config.yaml").serve.api_key is None

"""data.max_length left unset is chosen from the data (p99 of the token lengths, rounded up to 64), printed and
reported with the share it cuts; a value the user sets wins; a second prepare of the same inputs reuses."""

from __future__ import annotations

import json

from qatune.config import load_config
from qatune.data.prepare import prepare, prepare_or_reuse
from qatune.data.report import max_length_line
from tests.conftest import write_jsonl


def _records(tmp_path):
    # 99 short answers and one very long one: p99 sits at the short ones, so the long one is the 1% cut
    short = [{"question": f"问题 {i}：头疼怎么办？", "answer": "多休息，多喝水，注意观察体温变化。"} for i in range(99)]
    long = [{"question": "请详细说明高血压的治疗。", "answer": "高血压的治疗包括生活方式和药物。" * 60}]
    return write_jsonl(tmp_path / "qa.jsonl", short + long)


def _config(tmp_path, model_dir, data_file, *overrides: str):
    return load_config(None, [f"model={model_dir}", f"data.sources=[{data_file}]", f"data.output_dir={tmp_path / 'd'}",
                              "data.val_size=0", "data.clean.near_dedup=false", *overrides])


def test_an_unset_max_length_is_chosen_from_the_data_and_reported(tmp_path, tiny_model_dir) -> None:
    config = _config(tmp_path, tiny_model_dir, _records(tmp_path))
    prepared = prepare(config)
    choice = prepared.report["max_length_choice"]
    assert choice["source"] == "data" and choice["value"] % 64 == 0 and 128 <= choice["value"] < 1024
    assert choice["measured"] <= choice["value"] and choice["cut"] == 1 and choice["cut_share"] == 0.01
    assert prepared.report["max_length"] == choice["value"] == config.data.max_length, "the later stages get it"
    assert max(prepared.train["length"]) <= choice["value"]
    written = json.loads((tmp_path / "d" / "data_report.json").read_text(encoding="utf-8"))
    assert written["max_length_choice"] == choice
    assert "chosen from the data" in max_length_line(choice) and "1.0% of train samples cut" in max_length_line(choice)
    # The same inputs again, in a fresh config: the dataset is reused and the config gets the same length.
    again = _config(tmp_path, tiny_model_dir, tmp_path / "qa.jsonl")
    _, reused = prepare_or_reuse(again)
    assert reused and again.data.max_length == choice["value"]


def test_a_max_length_the_user_sets_is_used_as_given(tmp_path, tiny_model_dir) -> None:
    prepared = prepare(_config(tmp_path, tiny_model_dir, _records(tmp_path), "data.max_length=4096"))
    choice = prepared.report["max_length_choice"]
    assert (choice["source"], choice["value"], prepared.report["max_length"]) == ("config", 4096, 4096)
    assert choice["cut_share"] == 0.0 and "(data.max_length)" in max_length_line(choice)

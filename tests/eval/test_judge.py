"""The judge: reply parsing, scores and pairwise win rate on a scripted judge, agreement with experts on
the review sheet, and a whole comparison judged by `qatune serve` (the tiny model) over real HTTP."""

from __future__ import annotations

import csv
import json

import pytest

from qatune.config import load_config
from qatune.eval import judge
from qatune.eval.report import REVIEW_SHEET, summarize_review_sheet, write_review_sheet
from tests.serve.conftest import serve_config, start_server  # noqa: F401 (start_server is a fixture)

CFG = load_config(None, []).eval


def _rows(label: str, answers: list[str]) -> list[dict]:
    return [{"set": "zh", "id": str(i), "question": f"问题{i}是什么？", "reference": "参考答案。", "prediction": a}
            for i, a in enumerate(answers)]


def test_reply_parsing():
    assert judge.parse_scores('好的。{"reasoning": "基本正确", "correctness": 4, "relevance": 5}') == {
        "correctness": 4, "relevance": 5, "reasoning": "基本正确"}
    for malformed in ("4/5", '{"correctness": 6, "relevance": 2}', '{"correctness": "4"}', "{not json}", ""):
        assert judge.parse_scores(malformed) is None, malformed
    assert judge.parse_verdict("A") == "A" and judge.parse_verdict("Answer B is better.") == "B"
    assert judge.parse_verdict("平局") == "tie" and judge.parse_verdict("tie") == "tie"
    assert judge.parse_verdict("A or B") is None and judge.parse_verdict("不知道") is None


def test_rubric_follows_the_question_language():
    prompts = []
    judge.score_answers(lambda p: prompts.extend(p) or ["{}"] * len(p),
                        _rows("base", ["答"]) + [{"set": "en", "id": "e", "question": "What is a fever?",
                                                  "reference": "A raised temperature.", "prediction": "Heat."}])
    assert "参考答案" in prompts[0][0]["content"] and "Reference answer" in prompts[1][0]["content"]


def test_scores_are_kept_and_malformed_replies_counted():
    rows = _rows("tuned", ["好答案", "坏答案", "其他"])
    replies = ['{"reasoning": "ok", "correctness": 5, "relevance": 4}', "I cannot grade this",
               '{"reasoning": "so-so", "correctness": 3, "relevance": 4}']
    counts = judge.score_answers(lambda prompts: replies[:len(prompts)], rows)
    assert counts == {"judged": 2, "malformed": 1}
    assert rows[0]["judge"]["reasoning"] == "ok" and rows[1]["judge"]["malformed"]
    summary = judge.judge_summary(rows, CFG)
    assert summary["judge_correctness"] == 4.0 and summary["judge_malformed"] == 1
    low, high = summary["judge_correctness_interval"]
    assert 3.0 <= low <= 4.0 <= high <= 5.0


def test_pairwise_randomises_the_order():
    base = _rows("base", ["短"] * 200)
    tuned = _rows("tuned", ["一个更长的回答"] * 200)
    pairs = list(zip(base, tuned))
    always_a = judge.pairwise(lambda prompts: ["A"] * len(prompts), pairs, CFG)
    assert always_a["compared"] == 200 and 40 < always_a["win_rate"] < 60 and not always_a["significant"]

    def prefers_longer(prompts):
        return ["A" if p[0]["content"].index("一个更长") < p[0]["content"].index("回答 B") else "B" for p in prompts]

    longer = judge.pairwise(prefers_longer, pairs, CFG)
    assert longer["win_rate"] == 100.0 and longer["significant"] and longer["tuned_wins"] == 200
    garbled = judge.pairwise(lambda prompts: ["???"] * len(prompts), pairs[:5], CFG)
    assert garbled["malformed"] == 5 and "win_rate" not in garbled


def test_review_sheet_carries_judge_scores_and_agreement(tmp_path):
    rows = _rows("tuned", ["甲", "乙", "丙", "丁"])
    for row, score in zip(rows, (5, 4, 2, 1)):
        row["judge"] = {"correctness": score, "relevance": 3, "reasoning": f"理由{score}"}
    sheet = tmp_path / REVIEW_SHEET
    write_review_sheet({"tuned": rows}, sheet)
    with sheet.open(encoding="utf-8-sig", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["judge_correctness"] for r in table] == ["5", "4", "2", "1"] and table[0]["judge_reasoning"] == "理由5"
    for row, expert in zip(table, ("5", "3", "2", "2")):
        row["score"] = expert
    with sheet.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    agreement = summarize_review_sheet(sheet)["groups"][0]["judge_agreement"]
    assert agreement["pairs"] == 4 and agreement["exact"] == 50.0 and agreement["within_one"] == 100.0
    assert agreement["spearman"] == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr


@pytest.mark.slow
def test_judge_over_http_with_qatune_serve(start_server, tiny_model_dir, qa_file, tmp_path):  # noqa: F811
    from qatune.eval.run import ModelSpec, evaluate

    server = start_server(serve_config(tiny_model_dir))
    name = next(iter(server.engine.models))
    config = load_config(None, [f"eval.data={json.dumps([str(qa_file)])}", "eval.max_samples=4", "model.dtype=float32",
                                "eval.decoding.max_new_tokens=4", f"eval.output_dir={tmp_path / 'out'}",
                                "eval.judge.mode=both", f"eval.judge.endpoint.url={server.url}/v1",
                                f"eval.judge.endpoint.model={name}", "eval.judge.decoding.max_new_tokens=8"])
    specs = [ModelSpec("base", str(tiny_model_dir)), ModelSpec("tuned", str(tiny_model_dir))]
    report = evaluate(config, specs).report
    # The random tiny model replies with noise: every reply is malformed, counted, and the run completes.
    scored = report.judge["scored"]
    assert scored["base"] == {"judged": 0, "malformed": 4} and scored["tuned"] == {"judged": 0, "malformed": 4}
    assert report.judge["pairwise"]["qa"]["malformed"] == 4
    # 4 answers of each model scored, 4 pairs compared: 12 chat completions answered over HTTP.
    assert server.metric("qatune_requests_total", route="/v1/chat/completions", status="200") == 12
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.tuned.jsonl").open(encoding="utf-8")]
    assert all(r["judge"]["malformed"] and isinstance(r["judge"]["reply"], str) for r in rows)
    assert "4 malformed replies" in (tmp_path / "out" / "eval_report.md").read_text(encoding="utf-8")

    # The same tiny model as a local judge (eval.judge.model), on one model's answers.
    local = load_config(None, [f"eval.data={json.dumps([str(qa_file)])}", "eval.max_samples=2", "model.dtype=float32",
                               "eval.decoding.max_new_tokens=4", f"eval.output_dir={tmp_path / 'local'}",
                               "eval.judge.mode=score", f"eval.judge.model={json.dumps(str(tiny_model_dir))}",
                               "eval.judge.decoding.max_new_tokens=8"])
    report = evaluate(local, [ModelSpec("model", str(tiny_model_dir))]).report
    assert report.judge["scored"]["model"] == {"judged": 0, "malformed": 2}
    assert report.scores["qa"]["model"]["judge_malformed"] == 2

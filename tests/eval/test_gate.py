"""The promotion gate: fails a worse model, passes a better one; and `qatune eval --gate` exits with 3."""

from __future__ import annotations

import json

import pytest

from qatune.config import load_config
from qatune.eval import compare
from qatune.eval.sets import EvalSet


def _rows(label_scores: list[float], set_name: str = "zh") -> list[dict]:
    return [{"set": set_name, "id": str(i), "prediction": "x", "flags": [], "reference_loss": None,
             "scores": {"bleu4": v, "rouge1": v, "rouge2": v, "rougeL": v, "exact_match": 0.0, "token_f1": v}}
            for i, v in enumerate(label_scores)]


def _decide(base: list[float], tuned: list[float], *overrides: str) -> dict:
    cfg = load_config(None, list(overrides)).eval
    sets = [EvalSet("zh", "domain")]
    by_set = compare.all_intervals(sets, {"base": _rows(base), "tuned": _rows(tuned)}, cfg)
    return compare.gate(by_set, sets, {"warnings": []}, cfg.gate)


BASE = [float(10 + (i * 7) % 30) for i in range(100)]


def test_gate_fails_a_worse_model_and_passes_a_better_one():
    worse = _decide(BASE, [v - 5 for v in BASE])
    assert not worse["passed"] and len(worse["reasons"]) == 2  # token_f1 and rougeL (the default gate metrics)
    assert "token_f1 on zh is worse than base by 5.00 points" in " ".join(worse["reasons"])
    better = _decide(BASE, [v + 3 for v in BASE])
    assert better["passed"] and better["reasons"] == [] and len(better["checked"]) == 2


def test_gate_margins_noise_and_forgetting():
    slightly_worse = [v - 0.5 for v in BASE]
    assert _decide(BASE, slightly_worse)["passed"]  # within the 1-point margin
    assert not _decide(BASE, slightly_worse, 'eval.gate.metrics={"token_f1": 0.2}')["passed"]
    noisy = [v + (8 if i % 2 else -12) for i, v in enumerate(BASE[:20])]  # -2 on average, interval holds zero
    assert _decide(BASE[:20], noisy)["passed"]
    assert not _decide(BASE[:20], noisy, "eval.gate.significant_only=false")["passed"]
    cfg = load_config(None, []).eval
    forgot = compare.gate({}, [], {"warnings": ["WARNING: general accuracy on mmlu fell"]}, cfg.gate)
    assert not forgot["passed"] and any("mmlu fell" in r for r in forgot["reasons"])
    assert any("none of the gate metrics" in r for r in forgot["reasons"])  # nothing measured is no pass


@pytest.mark.slow
def test_gate_cli_exits_3_for_a_worse_model_and_0_for_an_equal_one(tiny_model_dir, qa_file, tmp_path, capsys):
    from qatune.cli import main

    common = ["--data", str(qa_file), "eval.max_samples=6", "eval.decoding.max_new_tokens=4", "model.dtype=float32",
              'eval.gate.metrics={"perplexity": 0.0}', "eval.gate.significant_only=false"]
    same = main(["eval", "--compare", str(tiny_model_dir), str(tiny_model_dir), "--gate",
                 "--out", str(tmp_path / "same"), *common])
    assert same == 0 and "GATE PASSED" in capsys.readouterr().out
    report = json.loads((tmp_path / "same" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["gate"]["passed"] and report["gate"]["checked"][0]["worse_by"] == pytest.approx(0.0)

    # A negative margin demands an improvement, which an identical model (and its earlier evaluation,
    # eval.gate.previous) cannot give: the gate fails against both.
    worse = main(["eval", "--compare", str(tiny_model_dir), str(tiny_model_dir), "--gate", "--out",
                  str(tmp_path / "again"), *common[:-2], 'eval.gate.metrics={"perplexity": -1.0}',
                  "eval.gate.significant_only=false",
                  f"eval.gate.previous={json.dumps(str(tmp_path / 'same'))}"])
    captured = capsys.readouterr()
    assert worse == 3 and "the promotion gate failed" in captured.err
    assert "perplexity on qa is worse than base" in captured.err
    assert "worse than the previous tuned model" in captured.err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(qa_file), "--gate",
                 "--out", str(tmp_path / "single")]) == 2
    assert "eval.gate (--gate) decides between a base and a tuned model" in capsys.readouterr().err

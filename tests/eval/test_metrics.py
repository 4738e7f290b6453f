"""Text metrics on hand-computed fixtures, and agreement with LLaMA-Factory's compute_metrics."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

from qatune.eval import metrics


def test_language_follows_the_reference():
    assert metrics.is_chinese("高血压患者应低盐饮食。")
    assert metrics.is_chinese("服用阿司匹林 (aspirin) 100mg，每天一次。")
    assert not metrics.is_chinese("Take aspirin 100 mg once a day (阿司匹林).")
    assert not metrics.is_chinese("")


def test_token_f1_and_exact_match_english_squad_style():
    # Lower case, punctuation and the articles a/an/the do not count.
    assert metrics.exact_match("The cat sat on the mat.", "a cat sat on a mat") == 100.0
    assert metrics.token_f1("The cat sat on the mat.", "a cat sat on a mat") == 100.0
    # pred {cat, sat}, ref {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3.
    assert metrics.token_f1("cat sat", "cat sat on mat") == pytest.approx(200 / 3)
    assert metrics.exact_match("cat sat", "cat sat on mat") == 0.0
    assert metrics.token_f1("dog", "cat") == 0.0


def test_token_f1_chinese_by_character():
    # pred 高血压要低盐饮食 (8 chars), ref 高血压患者要低盐 (8 chars): 6 in common, P = R = 3/4.
    assert metrics.token_f1("高血压要低盐饮食", "高血压患者要低盐。") == pytest.approx(75.0)
    # Full-width punctuation and spaces are ignored; Latin runs stay whole words.
    assert metrics.exact_match("低盐 饮食。", "低盐饮食") == 100.0
    assert metrics.answer_tokens("服用aspirin 100mg。") == ["服", "用", "aspirin", "100mg"]


def test_bleu4_chinese_by_character_hand_computed():
    # 高血压患者 vs 高血压病人, by character: 1-grams 3/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2 -> the
    # exponential (NIST) smoothing gives 1/(2*2). Equal lengths: no brevity penalty.
    expected = 100 * (3 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25
    assert metrics.score_answer("高血压患者", "高血压病人")["bleu4"] == pytest.approx(expected, abs=0.01)
    assert metrics.score_answer("高血压病人", "高血压病人")["bleu4"] == pytest.approx(100.0)


def test_bleu4_english_brevity_penalty_hand_computed():
    # 4 of 6 words, every n-gram matches: BLEU = BP = exp(1 - 6/4).
    score = metrics.score_answer("the cat sat on", "the cat sat on the mat")["bleu4"]
    assert score == pytest.approx(100 * math.exp(1 - 6 / 4), abs=0.01)


def test_rouge_english_words_hand_computed():
    # rouge-chinese (LLaMA-Factory's library) counts distinct n-grams for ROUGE-1/2:
    # 1-grams: pred {the, cat, sat}, ref {the, cat, sat, on, mat}: P 1, R 3/5 -> F 0.75.
    # 2-grams: pred 2, ref 5, all pred ones shared: P 1, R 2/5 -> F 4/7.
    # ROUGE-L: LCS 3 of ref's 6 words and pred's 3: P 1, R 1/2 -> F 2/3.
    scores = metrics.score_answer("The cat sat.", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(75.0, abs=1e-4)
    assert scores["rouge2"] == pytest.approx(400 / 7, abs=1e-4)
    assert scores["rougeL"] == pytest.approx(200 / 3, abs=1e-4)


def test_rouge_chinese_uses_jieba_words():
    words = metrics.rouge_words("高血压患者应该低盐饮食。", chinese=True)
    assert "高血压" in words and "饮食" in words
    assert metrics.score_answer("高血压患者应该低盐饮食。", "高血压患者应该低盐饮食。")["rougeL"] == pytest.approx(100.0)


def test_empty_prediction_scores_zero():
    assert metrics.score_answer("  ", "高血压患者应该低盐饮食。") == dict.fromkeys(metrics.TEXT_METRICS, 0.0)


def test_percentile_is_numpy_linear():
    assert metrics.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert metrics.percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)


# --- LLaMA-Factory's compute_metrics (scripts/eval_bleu_rouge.py, src/llamafactory/train/sft/metric.py):
# jieba words for ROUGE, characters for nltk's smoothed sentence BLEU-4, mean over answers x100.

def llamafactory_scores(prediction: str, label: str) -> dict[str, float]:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.CRITICAL)
    hypothesis, reference = list(jieba.cut(prediction)), list(jieba.cut(label))
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    return {"rouge1": result["rouge-1"]["f"] * 100, "rouge2": result["rouge-2"]["f"] * 100,
            "rougeL": result["rouge-l"]["f"] * 100, "bleu4": bleu * 100}


HANDWRITTEN = [
    ("高血压患者应该低盐饮食，每天食盐少于6克。", "高血压病人需要低盐饮食，每日食盐摄入少于6克，并规律服药。"),
    ("建议去医院做胃镜检查。", "建议到正规医院消化内科做胃镜检查，明确诊断后再治疗。"),
    ("多喝水，注意休息。", "感冒期间要多喝温水，注意休息，必要时服用感冒药。"),
    ("幽门螺杆菌阴性，说明没有感染。", "幽门螺杆菌抗体阴性表示目前没有感染，不具有传染性。"),
    ("你好，这种情况可能是胃炎引起的，建议口服奥美拉唑。", "你好，考虑是慢性胃炎，可以口服奥美拉唑和胃药，饮食清淡。"),
    ("不清楚。", "需要结合血常规和肝功能检查结果综合判断。"),
]


def _agreement(pairs: list[tuple[str, str]]) -> dict[str, float]:
    ours = [metrics.score_answer(p, r) for p, r in pairs]
    theirs = [llamafactory_scores(p, r) for p, r in pairs]
    return {k: abs(metrics.mean([o[k] for o in ours]) - metrics.mean([t[k] for t in theirs]))
            for k in ("bleu4", "rouge1", "rouge2", "rougeL")}


def test_agrees_with_llamafactory_on_handwritten_chinese_answers():
    for metric, gap in _agreement(HANDWRITTEN).items():
        assert gap < 0.5, (metric, gap)


def test_agrees_with_llamafactory_on_medical_answers(shared_data):
    rows = [json.loads(line) for line in (shared_data / "zh_medical_qa" / "test.jsonl").open(encoding="utf-8")][:80]
    rng = random.Random(0)
    pairs = []
    for i, row in enumerate(rows):  # predictions of every quality: partial, unrelated, reordered, padded
        reference = row["answer"]
        clauses = reference.split("，")
        rng.shuffle(clauses)
        prediction = [reference[: len(reference) // 2], rows[(i + 1) % len(rows)]["answer"], "，".join(clauses),
                      row["question"] + reference[: len(reference) // 3]][i % 4]
        pairs.append((prediction, reference))
    for metric, gap in _agreement(pairs).items():
        assert gap < 0.5, (metric, gap)

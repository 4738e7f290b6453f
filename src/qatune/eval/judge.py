"""A model as judge (`eval.judge`): scores 1-5 and pairwise preferences, with a fixed rubric per language.

- score: each answer gets `correctness` (against the reference) and `relevance` (to the question),
  1-5, with the judge's reasoning; the reply must hold a JSON object with those keys. A reply
  that does not (no JSON, a score outside 1-5) is counted as malformed, its text kept, and the
  answer left unscored: it never stops the evaluation.
- pairwise: the judge sees the base and tuned answers as A and B, in an order drawn per question
  (seeded by eval.seed) so that a judge's preference for the first answer cancels out; it replies
  A, B or tie. The tuned model's win rate counts a tie as half a win, with a bootstrap interval.

The rubric is in the question's language (Chinese when `metrics.is_chinese`). The judge is an
OpenAI-compatible endpoint (`qatune.endpoint`, the client the data stages use) or a local model.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qatune.eval import confidence
from qatune.eval.metrics import is_chinese

if TYPE_CHECKING:
    from qatune.config.eval import EvalConfig
    from qatune.runtime import Runtime

Ask = Callable[[list[list[dict[str, str]]]], list[str]]  # conversations -> replies, in order
SCORES = ("correctness", "relevance")
JUDGE_METRICS = tuple(f"judge_{s}" for s in SCORES)

RUBRIC = {
    "en": ("You are grading an answer to a question. Compare it with the reference answer.\n"
           "correctness (1-5): 1 wrong or harmful, 2 mostly wrong, 3 partly right, 4 right with small gaps, "
           "5 right and complete as the reference.\n"
           "relevance (1-5): 1 off topic or a repeated question, 3 partly on topic, 5 answers exactly what was asked.\n"
           "Reply with one JSON object only: {{\"reasoning\": \"one or two sentences\", \"correctness\": N, "
           "\"relevance\": N}}\n\nQuestion: {question}\nReference answer: {reference}\nAnswer to grade: {answer}"),
    "zh": ("你是评分员，请对照参考答案为下面的回答评分。\n"
           "correctness（正确性，1-5）：1 错误或有害，2 大部分错误，3 部分正确，4 正确但略有缺漏，5 与参考答案一样正确完整。\n"
           "relevance（相关性，1-5）：1 答非所问或重复问题，3 部分相关，5 正好回答了所问的问题。\n"
           "只回复一个 JSON 对象：{{\"reasoning\": \"一两句理由\", \"correctness\": 分数, \"relevance\": 分数}}\n\n"
           "问题：{question}\n参考答案：{reference}\n待评回答：{answer}"),
}
PAIRWISE = {
    "en": ("Which answer to the question is better: more correct against the reference, then more relevant?\n"
           "Question: {question}\nReference answer: {reference}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
           "Reply with one word: A, B, or tie."),
    "zh": ("对照参考答案，哪个回答更好（先看正确性，再看相关性）？\n问题：{question}\n参考答案：{reference}\n\n"
           "回答 A：{a}\n\n回答 B：{b}\n\n只回复一个词：A、B 或 tie。"),
}
_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_VERDICT = re.compile(r"\b(A|B|tie)\b|(平局)", re.IGNORECASE)


def language(question: str) -> str:
    return "zh" if is_chinese(question) else "en"


def parse_scores(reply: str) -> dict[str, Any] | None:
    """{"correctness", "relevance", "reasoning"} from the first JSON object of the reply holding both scores
    as whole numbers 1-5; None if there is none (malformed)."""
    for match in _OBJECT.finditer(reply):
        try:
            found = json.loads(match.group())
        except json.JSONDecodeError:
            continue
        if not isinstance(found, dict):
            continue
        values = [found.get(k) for k in SCORES]
        if all(isinstance(v, int | float) and not isinstance(v, bool) and v in (1, 2, 3, 4, 5) for v in values):
            return {"correctness": int(values[0]), "relevance": int(values[1]),
                    "reasoning": str(found.get("reasoning", ""))}
    return None


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" when the reply names exactly one of them; None (malformed) otherwise."""
    found = {("tie" if (m.group(2) or m.group(1).lower() == "tie") else m.group(1).upper())
             for m in _VERDICT.finditer(reply)}
    return found.pop() if len(found) == 1 else None


def score_answers(ask: Ask, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Judge every Q&A row (each gets `judge`: scores and reasoning, or `malformed` with the reply); the counts."""
    answered = [r for r in rows if "prediction" in r]
    prompts = [[{"role": "user", "content": RUBRIC[language(r["question"])].format(
        question=r["question"], reference=r["reference"], answer=r["prediction"])}] for r in answered]
    malformed = 0
    for row, reply in zip(answered, ask(prompts) if prompts else []):
        parsed = parse_scores(reply)
        if parsed is None:
            malformed += 1
            row["judge"] = {"malformed": True, "reply": reply[:500]}
        else:
            row["judge"] = {**parsed, "reply": reply[:500]}
    return {"judged": len(answered) - malformed, "malformed": malformed}


def judge_summary(rows: list[dict[str, Any]], cfg: "EvalConfig") -> dict[str, Any]:
    """Mean judge scores of a model on a set, each with a bootstrap interval of the mean, and the malformed count."""
    import numpy as np

    judged = [r["judge"] for r in rows if "judge" in r and not r["judge"].get("malformed")]
    out: dict[str, Any] = {"judge_malformed": sum(1 for r in rows if r.get("judge", {}).get("malformed"))}
    for name in SCORES:
        values = [float(j[name]) for j in judged]
        if values:
            index = np.random.default_rng(cfg.seed).integers(0, len(values), size=(cfg.bootstrap_resamples,
                                                                                      len(values)))
            means = np.asarray(values)[index].mean(axis=1)
            tail = (1 - cfg.confidence) / 2 * 100
            low, high = np.percentile(means, [tail, 100 - tail])
            out[f"judge_{name}"] = float(np.mean(values))
            out[f"judge_{name}_interval"] = [float(low), float(high)]
    return out


def pairwise(ask: Ask, pairs: list[tuple[dict[str, Any], dict[str, Any]]], cfg: "EvalConfig") -> dict[str, Any]:
    """The tuned model's win rate against the base over paired Q&A rows (ties half), with its interval;
    each tuned row keeps the verdict under `pairwise`."""
    qa = [(b, t) for b, t in pairs if "prediction" in b and "prediction" in t]
    rng = random.Random(cfg.seed)
    tuned_first = [rng.random() < 0.5 for _ in qa]
    prompts = []
    for (base, tuned), first in zip(qa, tuned_first):
        a, b = (tuned, base) if first else (base, tuned)
        prompts.append([{"role": "user", "content": PAIRWISE[language(base["question"])].format(
            question=base["question"], reference=base["reference"], a=a["prediction"], b=b["prediction"])}])
    outcomes, malformed = [], 0
    for (_, tuned), first, reply in zip(qa, tuned_first, ask(prompts) if prompts else []):
        verdict = parse_verdict(reply)
        if verdict is None:
            malformed += 1
            tuned["pairwise"] = {"malformed": True, "reply": reply[:300], "tuned_was": "A" if first else "B"}
            continue
        won = 0.5 if verdict == "tie" else float((verdict == "A") == first)
        tuned["pairwise"] = {"verdict": verdict, "tuned_was": "A" if first else "B", "tuned_score": won}
        outcomes.append(won)
    result: dict[str, Any] = {"compared": len(outcomes), "malformed": malformed,
                              "tuned_wins": sum(o == 1 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
                              "base_wins": sum(o == 0 for o in outcomes)}
    if outcomes:
        # The win rate's interval: the bootstrap of (tuned score - 1/2), shifted back; significant when it excludes 1/2.
        centred = confidence.paired_bootstrap([0.5] * len(outcomes), outcomes, cfg.confidence,
                                              cfg.bootstrap_resamples, cfg.seed)
        result.update({"win_rate": 100 * (0.5 + centred.delta), "interval": [100 * (0.5 + centred.low),
                                                                            100 * (0.5 + centred.high)],
                       "significant": centred.significant})
    return result


def endpoint_judge(cfg: "EvalConfig") -> Ask:
    """Ask the judge behind eval.judge.endpoint (the OpenAI-compatible client the data stages use)."""
    from qatune.endpoint import chat_completions

    def ask(conversations: list[list[dict[str, str]]]) -> list[str]:
        return chat_completions(cfg.judge.endpoint, conversations, cfg.judge.decoding)

    return ask


def local_judge(cfg: "EvalConfig", model_cfg: Any, runtime: "Runtime") -> tuple[Ask, Callable[[], None]]:
    """eval.judge.model loaded here (its own template), and a function that frees it."""
    from qatune.infer.generation import generate
    from qatune.infer.load import load_for_inference

    loaded = [load_for_inference(model_cfg.model_copy(update={"name_or_path": cfg.judge.model}), runtime)]

    def ask(conversations: list[list[dict[str, str]]]) -> list[str]:
        judge = loaded[0]
        return [a.text for a in generate(judge.model, judge.tokenizer, judge.template.source, conversations,
                                         cfg.judge.decoding, judge.template.end_of_turn_id, cfg.batch_size)]

    return ask, loaded.clear

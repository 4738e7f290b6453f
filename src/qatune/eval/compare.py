"""Base against tuned: score deltas, the forgetting check, and answers side by side.

Read only when the evaluation has exactly a `base` and a `tuned` model (`qatune eval --compare`,
or after training); all three work on scores and predictions already made, never on a model.
"""

from __future__ import annotations

from typing import Any

from qatune.eval.sets import EvalSet


def deltas(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """tuned - base for every score both models have as a number."""
    return {k: tuned[k] - base[k] for k in base
            if isinstance(base[k], float) and isinstance(tuned.get(k), float)}


def forgetting_check(sets: list[EvalSet], predictions: dict[str, list[dict[str, Any]]],
                     scores: dict[str, dict[str, dict[str, Any]]], threshold: float) -> dict[str, Any]:
    """General multiple-choice accuracy, base against tuned: a warning where it fell by more than `threshold` points."""
    general = [s for s in sets if s.role == "general" and s.choice]
    result: dict[str, Any] = {"checked": bool(general), "threshold": threshold, "sets": {}, "warnings": []}
    if not general:
        result["note"] = "no general multiple-choice set was given (--general): forgetting was not checked"
    for s in general:
        base, tuned = scores[s.name]["base"]["accuracy"], scores[s.name]["tuned"]["accuracy"]
        paired = zip(*([r["correct"] for r in predictions[label] if r["set"] == s.name and "correct" in r]
                       for label in ("base", "tuned")))
        flips = [(b, t) for b, t in paired if b != t]
        drop = base - tuned
        result["sets"][s.name] = {"base": base, "tuned": tuned, "drop": drop, "items": len(s.choice),
                                  "right_to_wrong": sum(1 for b, _ in flips if b),
                                  "wrong_to_right": sum(1 for b, _ in flips if not b)}
        if drop > threshold:
            result["warnings"].append(
                f"WARNING: general accuracy on {s.name} fell {drop:.1f} points ({base:.1f} -> {tuned:.1f}, "
                f"{len(s.choice)} questions), more than the {threshold:g}-point threshold: the fine-tune may have "
                "forgotten general knowledge. Mix general data into training (data.general_sources with "
                "data.mix_ratio), or lower the learning rate or the epochs.")
    return result


def side_by_side(predictions: dict[str, list[dict[str, Any]]], count: int) -> list[dict[str, str]]:
    """The first `count` questions both models answered, with both answers and the reference."""
    tuned = {(r["set"], r["id"]): r for r in predictions["tuned"] if "prediction" in r}
    rows = []
    for base in (r for r in predictions["base"] if "prediction" in r):
        other = tuned.get((base["set"], base["id"]))
        if other is None or len(rows) >= count:
            continue
        rows.append({"set": base["set"], "question": base["question"], "reference": base["reference"],
                     "base": base["prediction"], "tuned": other["prediction"]})
    return rows

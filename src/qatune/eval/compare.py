"""Base against tuned: score deltas with paired intervals, the forgetting check, the promotion gate,
and answers side by side.

Read only when the evaluation has exactly a `base` and a `tuned` model (`qatune eval --compare`,
or after training); all of them work on scores and predictions already made, never on a model.
Items are paired by (set, id): both models answered the same questions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.eval import confidence, degenerate, metrics
from qatune.eval.confidence import Interval
from qatune.eval.sets import EvalSet

if TYPE_CHECKING:
    from qatune.config.eval import EvalConfig, GateConfig

LOWER_IS_BETTER = ("perplexity", "latency_p50_s", "latency_p95_s", "empty_answers", *degenerate.SHARES)


def deltas(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
    """tuned - base for every score both models have as a number."""
    return {k: tuned[k] - base[k] for k in base
            if isinstance(base[k], float) and isinstance(tuned.get(k), float)}


def paired(predictions: dict[str, list[dict[str, Any]]], set_name: str, base: str = "base",
           tuned: str = "tuned") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The (base row, tuned row) pairs of one set, for the items both answered, in the base's order."""
    by_id = {r["id"]: r for r in predictions[tuned] if r["set"] == set_name}
    return [(r, by_id[r["id"]]) for r in predictions[base] if r["set"] == set_name and r["id"] in by_id]


def intervals(pairs: list[tuple[dict[str, Any], dict[str, Any]]], cfg: "EvalConfig") -> dict[str, Interval]:
    """A paired interval for every per-item score of one set: generation metrics, degenerate-answer
    shares and perplexity by bootstrap, multiple-choice accuracy by McNemar."""
    level, resamples, seed = cfg.confidence, cfg.bootstrap_resamples, cfg.seed
    out: dict[str, Interval] = {}
    qa = [(b, t) for b, t in pairs if "prediction" in b and "prediction" in t]
    if qa:
        for name in metrics.TEXT_METRICS:
            out[name] = confidence.paired_bootstrap([b["scores"][name] for b, _ in qa],
                                                    [t["scores"][name] for _, t in qa], level, resamples, seed)
        for flag in degenerate.FLAGS:
            out[f"{flag}_share"] = confidence.paired_bootstrap(
                [100.0 * (flag in b.get("flags", ())) for b, _ in qa],
                [100.0 * (flag in t.get("flags", ())) for _, t in qa],
                level, resamples, seed)
        judged = [(b["judge"], t["judge"]) for b, t in qa
                  if not b.get("judge", {"malformed": True}).get("malformed")
                  and not t.get("judge", {"malformed": True}).get("malformed")]
        for name in ("correctness", "relevance"):
            if judged:
                out[f"judge_{name}"] = confidence.paired_bootstrap([float(b[name]) for b, _ in judged],
                                                                   [float(t[name]) for _, t in judged],
                                                                   level, resamples, seed)
        losses = [(b, t) for b, t in qa if all(r.get("reference_loss") is not None and r.get("reference_tokens")
                                                for r in (b, t))]
        if losses:
            out["perplexity"] = confidence.paired_bootstrap_perplexity(
                [(b["reference_loss"], b["reference_tokens"]) for b, _ in losses],
                [(t["reference_loss"], t["reference_tokens"]) for _, t in losses], level, resamples, seed)
    choice = [(b, t) for b, t in pairs if "correct" in b and "correct" in t]
    for name, key in (("accuracy", "correct"), ("accuracy_raw", "correct_raw")):
        if choice:
            out[name] = confidence.mcnemar(sum(1 for b, t in choice if b[key] and not t[key]),
                                           sum(1 for b, t in choice if t[key] and not b[key]), len(choice), level)
    return out


def all_intervals(sets: list[EvalSet], predictions: dict[str, list[dict[str, Any]]], cfg: "EvalConfig",
                  base: str = "base", tuned: str = "tuned") -> dict[str, dict[str, Interval]]:
    return {s.name: intervals(paired(predictions, s.name, base, tuned), cfg) for s in sets}


def forgetting_check(sets: list[EvalSet], predictions: dict[str, list[dict[str, Any]]],
                     scores: dict[str, dict[str, dict[str, Any]]], threshold: float,
                     level: float = 0.95) -> dict[str, Any]:
    """General multiple-choice accuracy, base against tuned: a warning where it fell by more than
    `threshold` points and the fall is significant (McNemar's exact test at `level`)."""
    general = [s for s in sets if s.role == "general" and s.choice]
    result: dict[str, Any] = {"checked": bool(general), "threshold": threshold, "level": level, "sets": {},
                              "warnings": []}
    if not general:
        result["note"] = "no general multiple-choice set was given (--general): forgetting was not checked"
    for s in general:
        base, tuned = scores[s.name]["base"]["accuracy"], scores[s.name]["tuned"]["accuracy"]
        choice = [(b, t) for b, t in paired(predictions, s.name) if "correct" in b and "correct" in t]
        right_to_wrong = sum(1 for b, t in choice if b["correct"] and not t["correct"])
        wrong_to_right = sum(1 for b, t in choice if t["correct"] and not b["correct"])
        interval = confidence.mcnemar(right_to_wrong, wrong_to_right, len(choice), level)
        drop = base - tuned
        significant = interval.significant and interval.delta < 0
        result["sets"][s.name] = {"base": base, "tuned": tuned, "drop": drop, "items": len(choice),
                                  "right_to_wrong": right_to_wrong, "wrong_to_right": wrong_to_right,
                                  "interval": interval.as_dict(), "significant_drop": significant}
        if drop > threshold and significant:
            result["warnings"].append(
                f"WARNING: general accuracy on {s.name} fell {drop:.1f} points ({base:.1f} -> {tuned:.1f}, "
                f"{len(choice)} questions; {interval.describe(1)}; McNemar p = {interval.p_value:.2g}), more than "
                f"the {threshold:g}-point threshold: the fine-tune may have forgotten general knowledge. Mix general "
                "data into training (data.general_sources with data.mix_ratio), or lower the learning rate or the "
                "epochs.")
    return result


def gate(by_set: dict[str, dict[str, Interval]], sets: list[EvalSet], forgetting: dict[str, Any] | None,
         cfg: "GateConfig", against: str = "base") -> dict[str, Any]:
    """The promotion decision: `passed`, and a reason for each failure (a gate metric worse beyond its
    margin, significant when cfg.significant_only; a forgetting warning; no gate metric measured at all)."""
    reasons: list[str] = []
    checked: list[dict[str, Any]] = []
    domain = {s.name for s in sets if s.role == "domain"}
    for set_name, found in by_set.items():
        if set_name not in domain:
            continue
        for metric, margin in cfg.metrics.items():
            interval = found.get(metric)
            if interval is None:
                continue
            loss = interval.delta if metric in LOWER_IS_BETTER else -interval.delta  # how much worse, in points
            failed = loss > margin and (interval.significant or not cfg.significant_only)
            checked.append({"set": set_name, "metric": metric, "against": against, "margin": margin,
                            "worse_by": loss, "interval": interval.as_dict(), "failed": failed})
            if failed:
                reasons.append(f"{metric} on {set_name} is worse than {against} by {loss:.2f} points "
                               f"({interval.describe()}), beyond the {margin:g}-point margin")
    if not checked:
        reasons.append(f"none of the gate metrics ({', '.join(cfg.metrics)}) was measured on a domain set against "
                       f"{against}: nothing shows the tuned model is not worse")
    if cfg.forgetting and forgetting:
        reasons += [w.removeprefix("WARNING: ") for w in forgetting["warnings"]]
    return {"passed": not reasons, "against": against, "checked": checked, "reasons": reasons}


def merge_gates(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One decision from the gate against the base and the one against a previous tuned model."""
    return {"passed": all(r["passed"] for r in results), "checked": [c for r in results for c in r["checked"]],
            "reasons": [reason for r in results for reason in r["reasons"]]}


def side_by_side(predictions: dict[str, list[dict[str, Any]]], count: int) -> list[dict[str, Any]]:
    """The first `count` questions both models answered, with both answers, their flags and the reference."""
    tuned = {(r["set"], r["id"]): r for r in predictions["tuned"] if "prediction" in r}
    rows = []
    for base in (r for r in predictions["base"] if "prediction" in r):
        other = tuned.get((base["set"], base["id"]))
        if other is None or len(rows) >= count:
            continue
        rows.append({"set": base["set"], "question": base["question"], "reference": base["reference"],
                     "base": base["prediction"], "tuned": other["prediction"],
                     "base_flags": base.get("flags", []), "tuned_flags": other.get("flags", [])})
    return rows

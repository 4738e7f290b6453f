"""The evaluation stage: answer every set with each model, score, compare, write the reports.

`evaluate(config, specs)` runs one model (`qatune eval --model M [--adapter A]`) or a base and a
tuned model (`qatune eval --compare BASE TUNED`, and `eval.after_train`). Both models answer with
the same chat template, the tuned model's, so a difference comes from the weights, not the prompt.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import __version__
from qatune.config import EvalConfig, QatuneConfig
from qatune.eval import metrics
from qatune.eval.sets import EvalError, EvalSet, load_eval_set
from qatune.models import ADAPTER_FILE

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a base model (default, HF folder, .gguf, hub id) and an optional adapter."""

    label: str
    model: str
    adapter: str | None = None

    def describe(self) -> str:
        return f"{self.model} + {self.adapter}" if self.adapter else self.model


def tuned_spec(tuned: str, base: str) -> ModelSpec:
    """The tuned side of a comparison: an adapter folder goes on `base`; anything else is a whole model."""
    path = Path(tuned)
    return ModelSpec("tuned", base, str(path)) if (path / ADAPTER_FILE).is_file() else ModelSpec("tuned", tuned)


@dataclass
class EvalResult:
    output_dir: Path
    report: dict[str, Any]
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by model label


def load_sets(cfg: EvalConfig, encoding: str = "utf-8") -> list[EvalSet]:
    sets = [load_eval_set(s, "domain", cfg.max_samples, encoding) for s in cfg.data]
    sets += [load_eval_set(s, "general", cfg.max_samples, encoding) for s in cfg.general]
    names = [s.name for s in sets]
    for s in sets:  # two files both called test.jsonl must not share a row in the report
        if names.count(s.name) > 1:
            s.name = f"{s.role}/{s.name}"
    return sets


def evaluate(config: QatuneConfig, specs: list[ModelSpec], sets: list[EvalSet] | None = None,
             console: "Console | None" = None) -> EvalResult:
    """Evaluate each model on each set; write predictions, review sheet and reports to eval.output_dir."""
    import torch
    import transformers
    from rich.console import Console

    from qatune.eval import report as eval_report
    from qatune.infer.load import load_for_inference
    from qatune.models import configured_dtype

    console = console or Console()
    transformers.utils.logging.disable_progress_bar()
    cfg = config.eval
    sets = sets if sets is not None else load_sets(cfg, config.data.encoding)
    if not sets:
        raise EvalError("nothing to evaluate: no evaluation set given",
                        hint="pass --data FILE (Q&A or multiple choice) and optionally --general FILE")
    for s in sets:
        skipped = ", ".join(f"{n} {r}" for r, n in s.skipped.by_reason().items())
        console.print(f"Set {s.name} ({s.role}): {len(s.qa)} Q&A, {len(s.choice)} multiple choice"
                      + (f"; skipped {skipped}" if skipped else ""))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = configured_dtype(config.model, device)
    template_source = _template_source(config, specs[-1])
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        started = time.perf_counter()
        model, tokenizer, template = load_for_inference(config.model, spec.model, spec.adapter, template_source,
                                                        dtype, device)
        console.print(f"Evaluating {spec.label}: {spec.describe()} ({str(dtype).removeprefix('torch.')} on {device})")
        predictions[spec.label] = []
        for s in sets:
            summary, rows = evaluate_set(model, tokenizer, template, s, cfg, config.data.max_length)
            scores.setdefault(s.name, {})[spec.label] = summary
            predictions[spec.label] += rows
        console.print(f"  done in {time.perf_counter() - started:.0f} s")
        del model
        gc.collect()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "qatune_version": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": [{"label": s.label, "model": s.model, "adapter": s.adapter} for s in specs],
        "device": device, "dtype": str(dtype).removeprefix("torch."),
        "decoding": {k: getattr(cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty",
                                                   "batch_size")},
        "methods": {**metrics.METHODS, "bleu_signatures": metrics.bleu_signatures()},
        "sets": [{"name": s.name, "role": s.role, "qa_items": len(s.qa), "choice_items": len(s.choice),
                  "skipped": s.skipped.by_reason(),
                  "skipped_items": [dataclasses.asdict(d) for d in s.skipped.drops]} for s in sets],
        "scores": scores,
    }
    if [s.label for s in specs] == ["base", "tuned"]:
        report["deltas"] = {name: _deltas(by_model["base"], by_model["tuned"]) for name, by_model in scores.items()}
        report["forgetting"] = forgetting_check(sets, predictions, scores, cfg.forgetting_threshold)
        report["side_by_side"] = _side_by_side(predictions, cfg.side_by_side)
    eval_report.write_all(report, predictions, out)  # adds report["files"]
    return EvalResult(out, report, predictions)


def _template_source(config: QatuneConfig, spec: ModelSpec) -> str:
    """The chat template every model answers with: the one `spec` (the tuned model) was trained on."""
    from qatune.infer.load import trained_template

    return trained_template(config.model, spec.model, spec.adapter, config.data.template).source


def evaluate_set(model: Any, tokenizer: Any, template: Any, eval_set: EvalSet, cfg: EvalConfig,
                 max_length: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model on one set: the set's summary scores and one row per item."""
    from qatune.eval.scoring import choice_predictions, corpus_perplexity, reference_losses
    from qatune.infer.generation import Decoding, generate

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.end_of_turn_id
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if eval_set.qa:
        started = time.perf_counter()
        answers = generate(model, tokenizer, template.source, [item.prompt for item in eval_set.qa],
                           Decoding.from_config(cfg), template.end_of_turn_id, cfg.batch_size)
        seconds = time.perf_counter() - started
        losses = reference_losses(model, tokenizer, template, eval_set.qa, max_length, pad_id, cfg.batch_size)
        for item, answer, loss in zip(eval_set.qa, answers, losses):
            rows.append({"set": eval_set.name, "id": item.id, "question": item.question, "reference": item.reference,
                         "prediction": answer.text, "scores": metrics.score_answer(answer.text, item.reference),
                         "reference_loss": loss[0] if loss else None, "new_tokens": answer.new_tokens,
                         "latency_s": answer.seconds})
        latencies = [r["latency_s"] for r in rows]
        summary.update({name: metrics.mean([r["scores"][name] for r in rows]) for name in metrics.TEXT_METRICS})
        summary.update({
            "perplexity": corpus_perplexity(losses), "answers": len(rows),
            "empty_answers": sum(1 for r in rows if not r["prediction"].strip()),
            "latency_p50_s": metrics.percentile(latencies, 50), "latency_p95_s": metrics.percentile(latencies, 95),
            "tokens_per_s": sum(r["new_tokens"] for r in rows) / seconds if seconds else 0.0,
        })
    if eval_set.choice:
        picks = choice_predictions(model, tokenizer, template, eval_set.choice, pad_id, cfg.batch_size)
        for item, pick in zip(eval_set.choice, picks):
            rows.append({"set": eval_set.name, "id": item.id, "question": item.question, "choices": item.choices,
                         "answer": item.answer, "pick": pick["pick_norm"], "correct": pick["pick_norm"] == item.answer,
                         "correct_raw": pick["pick"] == item.answer, "logprobs": pick["logprobs"]})
        judged = [r for r in rows if "correct" in r]
        summary.update({"accuracy": 100 * metrics.mean([r["correct"] for r in judged]),
                        "accuracy_raw": 100 * metrics.mean([r["correct_raw"] for r in judged]),
                        "choice_items": len(judged)})
    return summary, rows


def _deltas(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, float]:
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


def _side_by_side(predictions: dict[str, list[dict[str, Any]]], count: int) -> list[dict[str, str]]:
    tuned = {(r["set"], r["id"]): r for r in predictions["tuned"] if "prediction" in r}
    rows = []
    for base in (r for r in predictions["base"] if "prediction" in r):
        other = tuned.get((base["set"], base["id"]))
        if other is None or len(rows) >= count:
            continue
        rows.append({"set": base["set"], "question": base["question"], "reference": base["reference"],
                     "base": base["prediction"], "tuned": other["prediction"]})
    return rows

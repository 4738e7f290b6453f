"""The evaluation recipe: answer every set with each model, score, compare, write the reports.

- `plan(config, runtime, specs, sets=None)`: reads the sets (small text files; a set with no
  usable item is refused here, before any weight), decides device, dtype, the output folder and
  which files of an earlier evaluation there it would overwrite. Writes nothing.
- `setup(plan)`: the chat template every model answers with: the tuned model's (the last spec's),
  so a difference between base and tuned comes from the weights, not the prompt.
- `run(plan, components)`: loads each model in turn, has it answer and score every set, frees it
  before the next (one model in memory at a time), then writes predictions, review sheet and reports.

One model (`qatune eval --model M [--adapter A]`) or a base and a tuned model (`qatune eval
--compare BASE TUNED`, and evaluation after training); with exactly `base` and `tuned` the report
adds deltas with paired intervals, the forgetting check, the gate (eval.gate) and answers side by side.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune import __version__
from qatune import files as atomic
from qatune.config import EvalConfig, QatuneConfig
from qatune.eval import compare, degenerate, diagnosis, metrics
from qatune.eval.report import (
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    REVIEW_SHEET,
    EvalReport,
    predictions_file,
    read_predictions,
    write_review_sheet,
    written_files,
)
from qatune.eval.sets import EvalError, EvalSet, load_eval_set
from qatune.files import model_folders, overlapping
from qatune.runtime import Runtime

if TYPE_CHECKING:
    import torch

    from qatune.config import ModelConfig
    from qatune.data.templates import ChatTemplate

COMPARED = ("base", "tuned")  # the labels of a comparison
INTERVAL_METHOD = ("paired over items (both models answer the same ones): percentile bootstrap of the mean "
                   "difference for generation metrics and answer shares, of the corpus perplexity difference for "
                   "perplexity; exact McNemar test on right/wrong flips for multiple choice, with the interval from "
                   "Clopper-Pearson on the flips. 'no significant change' when the interval holds zero")


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
    from qatune.models import read_adapter

    return ModelSpec("tuned", base, str(Path(tuned))) if read_adapter(tuned) is not None else ModelSpec("tuned", tuned)


@dataclass(frozen=True)
class EvalPlan:
    config: QatuneConfig
    runtime: Runtime
    specs: tuple[ModelSpec, ...]  # answered in this order; the last one's template is everyone's
    sets: tuple[EvalSet, ...]
    dtype: "torch.dtype"  # every model's, from runtime.dtype(model)
    output_dir: Path
    overwrites: tuple[str, ...]  # files of an earlier evaluation in output_dir that this one replaces
    previous: tuple[dict[str, Any], ...] = ()  # eval.gate.previous's tuned predictions, for the gate

    @property
    def compares(self) -> bool:
        """A base against a tuned model: the report adds deltas, forgetting and side by side."""
        return tuple(s.label for s in self.specs) == COMPARED


@dataclass(frozen=True)
class EvalComponents:
    template: "ChatTemplate"  # the tuned model's training template
    tuned_tokenizer: Any  # the last spec's tokenizer, loaded once


@dataclass(frozen=True)
class EvalResult:
    output_dir: Path
    report: EvalReport
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by model label

    def headline(self) -> dict[str, Any]:
        """The report's path, the deltas, the forgetting warnings and the diagnosis' titles: what a training
        report keeps of it."""
        report = self.report
        return {"report": str(self.output_dir / REPORT_JSON), "deltas": report.deltas or {},
                "forgetting_warnings": (report.forgetting or {}).get("warnings", []),
                "diagnosis": [f["title"] for f in (report.diagnosis or {}).get("findings", [])]}


def load_sets(cfg: EvalConfig, encoding: str = "utf-8") -> list[EvalSet]:
    """The domain (eval.data) and general (eval.general) sets, each name unique."""
    sources = [(s, "domain") for s in cfg.data] + [(s, "general") for s in cfg.general]
    sets = [load_eval_set(s, role, cfg.max_samples, encoding) for s, role in sources]
    # Two files both called test.jsonl must not share a row in the report: each is named by its folder
    # too (zh_medical_qa/test, en_medical_qa/test), then, where that is not enough, numbered.
    for rename in (lambda i: f"{Path(sources[i][0].path).resolve().parent.name}/{sets[i].name}",
                   lambda i: f"{sets[i].name}#{i + 1}"):
        names = [s.name for s in sets]
        for i in [i for i, name in enumerate(names) if names.count(name) > 1]:
            sets[i].name = rename(i)
    return sets


def plan(config: QatuneConfig, runtime: Runtime, specs: list[ModelSpec],
         sets: list[EvalSet] | None = None) -> EvalPlan:
    """Check and decide: the sets (`sets`, else the config's, read now), dtype, output folder."""
    cfg = config.eval
    sets = sets if sets is not None else load_sets(cfg, config.data.encoding)
    if not sets:
        raise EvalError("nothing to evaluate: no evaluation set given",
                        hint="pass --data FILE (Q&A or multiple choice) and optionally --general FILE")
    if not specs:
        raise EvalError("nothing to evaluate: no model given", hint="pass --model M, or --compare BASE TUNED")
    out = Path(cfg.output_dir)
    models = [_model_config(config, spec) for spec in specs]
    inside = next((f for m, s in zip(models, specs) if (f := overlapping(out, model_folders(m, (s.adapter,)),
                                                                      or_inside=True))), None)
    if inside is not None:
        raise EvalError(f"eval.output_dir {out} is (or holds) the model folder {inside}: reports never go among "
                        "the weights they evaluate", hint="choose another eval.output_dir (--out)")
    overwrites = tuple(name for name in written_files([s.label for s in specs]) if (out / name).exists())
    previous: list[dict[str, Any]] = []
    if cfg.judge.mode in ("pairwise", "both") and tuple(s.label for s in specs) != COMPARED:
        raise EvalError(f"eval.judge.mode {cfg.judge.mode} picks the better of a base and a tuned answer",
                        hint="run qatune eval --compare BASE TUNED, or set eval.judge.mode=score")
    if cfg.gate.enabled:
        if tuple(s.label for s in specs) != COMPARED:
            raise EvalError("eval.gate (--gate) decides between a base and a tuned model",
                            hint="run qatune eval --compare BASE TUNED --gate")
        if cfg.gate.previous:
            previous = read_predictions(Path(cfg.gate.previous) / predictions_file("tuned"))
    return EvalPlan(config, runtime, tuple(specs), tuple(sets), runtime.dtype(config.model), out, overwrites,
                    tuple(previous))


def setup(plan: EvalPlan) -> EvalComponents:
    """The template every model answers with: the one the tuned model (the last spec) was trained on;
    items whose text holds one of its control tokens are skipped and counted (they could forge a turn)."""
    from qatune.data.templates import resolve_template
    from qatune.eval.sets import drop_control_tokens
    from qatune.infer.load import inference_tokenizer

    spec = plan.specs[-1]
    tokenizer = inference_tokenizer(_model_config(plan.config, spec), spec.adapter)
    for eval_set in plan.sets:
        drop_control_tokens(eval_set, tokenizer)
    return EvalComponents(resolve_template(tokenizer, plan.config.data.template), tokenizer)


def _model_config(config: QatuneConfig, spec: ModelSpec) -> "ModelConfig":
    return config.model.model_copy(update={"name_or_path": spec.model})


def run(plan: EvalPlan, components: EvalComponents) -> EvalResult:
    """Each model on each set, one model in memory at a time; then the reports in output_dir."""
    from qatune.infer.load import load_for_inference

    console, cfg = plan.runtime.console, plan.config.eval
    for s in plan.sets:
        skipped = ", ".join(f"{n} {r}" for r, n in s.skipped.by_reason().items())
        console.print(f"Set {s.name} ({s.role}): {len(s.qa)} Q&A, {len(s.choice)} multiple choice"
                      + (f"; skipped {skipped}" if skipped else ""))
    dtype, device = str(plan.dtype).removeprefix("torch."), plan.runtime.device
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for spec in plan.specs:
        started = time.perf_counter()
        loaded = load_for_inference(_model_config(plan.config, spec), plan.runtime, spec.adapter,
                                    template_source=components.template.source,
                                    tokenizer=components.tuned_tokenizer if spec is plan.specs[-1] else None)
        console.print(f"Evaluating {spec.label}: {spec.describe()} ({dtype} on {device})")
        predictions[spec.label] = []
        for s in plan.sets:
            summary, rows = evaluate_set(loaded.model, loaded.tokenizer, loaded.template, s, cfg,
                                         plan.config.data.max_length)
            for preset in cfg.decoding_presets:
                summary.setdefault("presets", {})[preset] = answer_with_preset(
                    loaded.model, loaded.tokenizer, loaded.template, s, cfg, preset, rows)
            scores.setdefault(s.name, {})[spec.label] = summary
            predictions[spec.label] += rows
        console.print(f"  done in {time.perf_counter() - started:.0f} s")
        del loaded  # the next model loads into the memory this one held
        gc.collect()
    judged = run_judge(plan, scores, predictions) if cfg.judge.mode != "off" else None

    if plan.overwrites:
        console.print(f"Replacing {', '.join(plan.overwrites)} of an earlier evaluation in {plan.output_dir}/")
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    report = _report(plan, scores, predictions, judged)
    write_files(report, predictions, plan.output_dir)
    return EvalResult(plan.output_dir, report, predictions)


def write_files(report: EvalReport, predictions: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """Predictions, review sheet and the reports (each to a temporary name, then renamed); the report lists them."""
    from qatune.eval.render import html_page, markdown
    from qatune.reports import write_report

    for label, rows in predictions.items():
        atomic.write_jsonl(out / predictions_file(label), rows)
    write_review_sheet(predictions, out / REVIEW_SHEET)
    report.files = written_files(list(predictions))
    write_report(report, out / REPORT_JSON)
    atomic.write_text(out / REPORT_MD, markdown(report))
    atomic.write_text(out / REPORT_HTML, html_page(report))


def run_judge(plan: EvalPlan, scores: dict[str, dict[str, dict[str, Any]]],
              predictions: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """eval.judge on the answers: scores into each row (`judge`) and each set's summary; the pairwise win rates."""
    from qatune.eval import judge

    cfg, console = plan.config.eval, plan.runtime.console
    free = None
    if cfg.judge.endpoint.url:
        from qatune.endpoint import describe

        ask, name = judge.endpoint_judge(cfg), describe(cfg.judge.endpoint)
    else:
        ask, free = judge.local_judge(cfg, plan.config.model, plan.runtime)
        name = str(cfg.judge.model)
    console.print(f"Judging the answers with {name} ({cfg.judge.mode})")
    out: dict[str, Any] = {"judge": name, "mode": cfg.judge.mode}
    try:
        if cfg.judge.mode in ("score", "both"):
            out["scored"] = {label: judge.score_answers(ask, rows) for label, rows in predictions.items()}
            for s in plan.sets:
                for label, rows in predictions.items():
                    if s.qa:
                        scores[s.name][label].update(judge.judge_summary([r for r in rows if r["set"] == s.name], cfg))
        if cfg.judge.mode in ("pairwise", "both"):
            out["pairwise"] = {s.name: judge.pairwise(ask, compare.paired(predictions, s.name), cfg)
                               for s in plan.sets if s.qa}
    finally:
        if free is not None:
            free()
            gc.collect()
    return out


def _report(plan: EvalPlan, scores: dict[str, dict[str, dict[str, Any]]],
            predictions: dict[str, list[dict[str, Any]]], judged: dict[str, Any] | None = None) -> EvalReport:
    cfg = plan.config.eval
    report = EvalReport(
        qatune_version=__version__, created=time.strftime("%Y-%m-%d %H:%M:%S"),
        models=[{"label": s.label, "model": s.model, "adapter": s.adapter} for s in plan.specs],
        device=plan.runtime.device, dtype=str(plan.dtype).removeprefix("torch."),
        decoding={**{k: getattr(cfg.decoding, k) for k in ("max_new_tokens", "temperature", "top_p",
                                                           "repetition_penalty")}, "batch_size": cfg.batch_size},
        confidence={"level": cfg.confidence, "bootstrap_resamples": cfg.bootstrap_resamples, "seed": cfg.seed},
        methods={**metrics.METHODS, "degenerate": degenerate.METHOD, "intervals": INTERVAL_METHOD,
                 "bleu_signatures": metrics.bleu_signatures()},
        sets=[{"name": s.name, "role": s.role, "qa_items": len(s.qa), "choice_items": len(s.choice),
               "skipped": s.skipped.by_reason(),
               "skipped_items": [dataclasses.asdict(d) for d in s.skipped.drops]} for s in plan.sets],
        scores=scores, judge=judged,
    )
    if plan.compares:
        sets = list(plan.sets)
        report.deltas = {name: compare.deltas(by_model["base"], by_model["tuned"])
                         for name, by_model in scores.items()}
        by_set = compare.all_intervals(sets, predictions, cfg)
        report.intervals = {name: {metric: i.as_dict() for metric, i in found.items()}
                            for name, found in by_set.items()}
        report.forgetting = compare.forgetting_check(sets, predictions, scores, cfg.forgetting_threshold,
                                                     cfg.confidence)
        report.side_by_side = compare.side_by_side(predictions, cfg.side_by_side)
        if cfg.gate.enabled:
            decisions = [compare.gate(by_set, sets, report.forgetting, cfg.gate)]
            if plan.previous:
                against = {"previous": list(plan.previous), "tuned": predictions["tuned"]}
                decisions.append(compare.gate(compare.all_intervals(sets, against, cfg, base="previous"), sets,
                                              None, cfg.gate, against=f"the previous tuned model ({cfg.gate.previous})"))
            report.gate = compare.merge_gates(decisions)
        tuned = plan.specs[-1]
        report.diagnosis = diagnosis.diagnose(predictions,
                                              diagnosis.read_training_evidence(tuned.adapter or tuned.model))
    return report


def evaluate_set(model: Any, tokenizer: Any, template: Any, eval_set: EvalSet, cfg: EvalConfig,
                 max_length: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model on one set: the set's summary scores and one row per item."""
    from qatune.eval.scoring import (
        choice_predictions,
        corpus_perplexity,
        reference_losses,
    )
    from qatune.infer.generation import generate

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.end_of_turn_id
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if eval_set.qa:
        started = time.perf_counter()
        answers = generate(model, tokenizer, template.source, [item.prompt for item in eval_set.qa],
                           cfg.decoding, template.end_of_turn_id, cfg.batch_size)
        seconds = time.perf_counter() - started
        losses = reference_losses(model, tokenizer, template, eval_set.qa, max_length, pad_id, cfg.batch_size)
        for item, answer, loss in zip(eval_set.qa, answers, losses):
            rows.append({"set": eval_set.name, "id": item.id, "question": item.question, "reference": item.reference,
                         "prediction": answer.text, "scores": metrics.score_answer(answer.text, item.reference),
                         "flags": degenerate.answer_flags(item.question, answer.text, answer.stopped),
                         "reference_loss": loss[0] if loss else None, "reference_tokens": loss[1] if loss else 0,
                         "new_tokens": answer.new_tokens, "stopped": answer.stopped, "latency_s": answer.seconds})
        latencies = [r["latency_s"] for r in rows]
        summary.update(_answer_scores(rows))
        summary.update({
            "perplexity": corpus_perplexity(losses), "answers": len(rows),
            "empty_answers": sum(1 for r in rows if not r["prediction"].strip()),
            "latency_p50_s": metrics.percentile(latencies, 50), "latency_p95_s": metrics.percentile(latencies, 95),
            "tokens_per_s": sum(r["new_tokens"] for r in rows) / seconds if seconds else 0.0,
        })
    if eval_set.pairs:  # a preference set: how often the model finds the chosen answer likelier (eval.preference)
        from qatune.eval.preference import pairwise

        pairs = pairwise(model, tokenizer, template, eval_set.pairs)
        summary.update({"pair_win_rate": 100 * pairs["win_rate"], "pair_margin": pairs["mean_margin"]})
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


def _answer_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean text metrics, then degenerate-answer shares and distinct-1/2, of Q&A rows."""
    return {**{name: metrics.mean([r["scores"][name] for r in rows]) for name in metrics.TEXT_METRICS},
            **degenerate.summary(rows)}


def answer_with_preset(model: Any, tokenizer: Any, template: Any, eval_set: EvalSet, cfg: EvalConfig, preset: str,
                       rows: list[dict[str, Any]]) -> dict[str, float]:
    """The set's questions answered again with a named decoding (eval.max_new_tokens kept): its metrics and
    degenerate-answer shares; each Q&A row keeps that answer under `presets`. Seeded by eval.seed."""
    import torch

    from qatune.config.eval import DECODING_PRESETS
    from qatune.infer.generation import generate

    if not eval_set.qa:
        return {}
    decoding = cfg.decoding.model_copy(update=DECODING_PRESETS[preset])
    torch.manual_seed(cfg.seed)  # sampled presets give the same answers run after run
    answers = generate(model, tokenizer, template.source, [item.prompt for item in eval_set.qa], decoding,
                       template.end_of_turn_id, cfg.batch_size)
    answered = []
    for item, answer, row in zip(eval_set.qa, answers, (r for r in rows if "prediction" in r)):
        found = {"prediction": answer.text, "scores": metrics.score_answer(answer.text, item.reference),
                 "flags": degenerate.answer_flags(item.question, answer.text, answer.stopped)}
        row.setdefault("presets", {})[preset] = found
        answered.append(found)
    return _answer_scores(answered)

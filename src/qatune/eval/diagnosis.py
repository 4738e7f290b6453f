"""What happened: checks that explain a comparison whose tuned model is not (clearly) better.

Each check is a function of evidence already at hand (the comparison's scores and predictions;
the tuned folder's train_report.json, config.yaml and prepared training data when it has them)
and returns a `Finding` (what fired, the evidence, the fix) or None. `diagnose` runs them all.
The thresholds are rules of thumb, named here so a finding can be traced to its rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qatune.config.train import TrainConfig
from qatune.eval.metrics import is_chinese
from qatune.reports import read_report
from qatune.train.learning_rate_advice import rate
from qatune.train.methods import ADAPTER_METHODS, LORA_METHODS
from qatune.train.report import REPORT_FILE, TrainReport

STILL_FALLING = 0.05  # train loss fell >= 5% between the last two quarters of the run
OVERFIT_RISE = 0.02  # final eval loss >= 2% above its best, while train loss kept falling
MEMORISED_SHARE = 0.10  # >= 10% of the tuned answers near-duplicate a training answer
# Adapter methods: optimizer steps x learning rate under this barely move the adapter. Between the issue's
# run that changed nothing (37 steps at 2e-4: 0.0074) and the demo's that helped (16 steps at 1e-3: 0.016).
STEP_BUDGET = 0.01
DEFAULT_LEARNING_RATE = TrainConfig.model_fields["learning_rate"].default  # measured for LoRA on the default model
DEFAULT_LORA_SCALE = 2.0  # lora_alpha / lora_rank of qatune's defaults (32 / 16): STEP_BUDGET is set at this scale
DEGENERATE_SHARE = 0.30  # >= 30% of the base model's answers are loops or the question echoed
MARKUP_SHARE = 0.10  # >= 10% of the tuned answers hold chat-template markup
RUN_ON_SHARE = 0.50  # >= half the tuned answers use all of max_new_tokens...
RUN_ON_MORE = 0.20  # ...and 20 points more of them than the base model's
MARKUP = ("<|im_start|>", "<|im_end|>", "<|assistant|>", "<|user|>", "<|endoftext|>", "### Response", "### Instruction",
          "\nassistant\n", "\nuser\n", "Human:", "Assistant:", "[INST]", "</s>")
# Model families that answer Chinese and English well at sizes a single GPU fine-tunes (why: the
# issue's base SmolLM2-135M loops in Chinese; these are trained on both languages).
FITTING_MODELS = {"zh": "Qwen2.5-1.5B-Instruct, Qwen2.5-3B-Instruct or Qwen2.5-7B-Instruct (Chinese and English)",
                  "en": "Llama-3.2-3B-Instruct or Qwen2.5-3B-Instruct"}


@dataclass(frozen=True)
class Finding:
    check: str
    title: str
    evidence: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class TrainingEvidence:
    """What the tuned model's folder says about its training."""

    folder: str
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    optimizer_steps: int = 0
    learning_rate: float | None = None
    method: str | None = None
    lora_scale: float | None = None  # lora_alpha / lora_rank: a LoRA update is scaled by it
    train_questions: list[str] = field(default_factory=list)
    train_answers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be read, so the checks it feeds were skipped


def read_training_evidence(folder: str | Path) -> TrainingEvidence | None:
    """The tuned folder's train_report.json (loss curves, steps), config.yaml (learning rate, method) and
    prepared training split (questions and answers); None when the folder holds no train_report.json."""
    folder = Path(folder)
    report_path = folder / REPORT_FILE
    if not report_path.is_file():
        return None
    report = read_report(TrainReport, report_path)
    history = report.loss_history
    evidence = TrainingEvidence(str(folder), [tuple(p) for p in history.get("train", [])],
                                [tuple(p) for p in history.get("eval", [])], report.global_step,
                                method=report.method or None)
    if not history:
        evidence.notes.append(f"{report_path} has no loss_history (an older qatune): loss-curve checks skipped")
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        evidence.notes.append(f"no {config_path}: learning-rate, memorisation and leakage checks skipped")
        return evidence
    from qatune.config import load_config
    from qatune.data.prepare import load_prepared
    from qatune.errors import QatuneError

    try:
        config = load_config(str(config_path), [])
    except QatuneError as exc:  # written by another qatune version, say: the answer checks still run
        evidence.notes.append(f"{config_path} does not load ({exc.message}): learning-rate, memorisation and "
                              "leakage checks skipped")
        return evidence
    evidence.learning_rate = config.train.learning_rate
    if config.method.name in LORA_METHODS:
        evidence.lora_scale = config.method.lora_alpha / config.method.lora_rank
    try:
        train = load_prepared(config.data.output_dir).train
    except QatuneError as exc:
        evidence.notes.append(f"the training data is not at {config.data.output_dir} ({exc.message}): "
                              "memorisation and leakage checks skipped")
        return evidence
    for messages in train["messages"] if "messages" in train.column_names else []:
        evidence.train_questions.append(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
        evidence.train_answers.append(next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), ""))
    return evidence


# --- the checks


def loss_still_falling(train_loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]]) -> Finding | None:
    """Train loss still dropping over the last quarter of the run (and eval loss at its lowest at the end)."""
    if len(train_loss) < 8:
        return None
    quarter = len(train_loss) // 4
    before = sum(v for _, v in train_loss[-2 * quarter:-quarter]) / quarter
    last = sum(v for _, v in train_loss[-quarter:]) / quarter
    eval_at_best = not eval_loss or eval_loss[-1][1] <= min(v for _, v in eval_loss)
    if before <= 0 or (before - last) / before < STILL_FALLING or not eval_at_best:
        return None
    return Finding("loss_still_falling", "Training stopped while the loss was still falling",
                   f"mean train loss {before:.3f} -> {last:.3f} ({(last - before) / before:+.1%}) between the last two "
                   f"quarters of the run (to step {train_loss[-1][0]})"
                   + (f"; eval loss at its lowest at the last evaluation ({eval_loss[-1][1]:.3f})" if eval_loss else ""),
                   "train longer: raise train.num_epochs (or train.max_steps), or a higher train.learning_rate")


def overfitting(train_loss: list[tuple[int, float]], eval_loss: list[tuple[int, float]]) -> Finding | None:
    """Eval loss rose from its best while train loss kept falling."""
    if len(eval_loss) < 3:
        return None
    best_step, best = min(eval_loss, key=lambda p: p[1])
    final_step, final = eval_loss[-1]
    train_at_best = [v for s, v in train_loss if s <= best_step][-1:]
    train_after = [v for s, v in train_loss if s > best_step]
    if best_step == final_step or final < best * (1 + OVERFIT_RISE) or not train_at_best or not train_after:
        return None
    if min(train_after[-3:]) >= train_at_best[0]:
        return None
    return Finding("overfitting", "Eval loss rose while train loss fell (overfitting)",
                   f"eval loss {best:.3f} at step {best_step} -> {final:.3f} at step {final_step}; train loss "
                   f"{train_at_best[0]:.3f} -> {train_after[-1]:.3f} over the same steps",
                   "fewer epochs (train.num_epochs) or more data; keep train.load_best_at_end (the best checkpoint)")


def memorised_answers(tuned_rows: list[dict[str, Any]], train_answers: list[str]) -> Finding | None:
    """Tuned answers that near-duplicate a training answer other than their own reference."""
    from qatune.config import CleanConfig
    from qatune.data.clean import NearDuplicateIndex

    answered = [r for r in tuned_rows if "prediction" in r and len(r["prediction"]) >= 10]
    if not answered or not train_answers:
        return None
    index = NearDuplicateIndex(CleanConfig())
    for i, answer in enumerate(train_answers):
        if len(answer) >= 10:
            index.add(index.signature(answer), str(i))
    copied = []
    for row in answered:
        match = index.match(index.signature(row["prediction"]))
        if match is not None and train_answers[int(match)] != row["reference"]:
            copied.append((row, train_answers[int(match)]))
    if len(copied) < 2 or len(copied) < MEMORISED_SHARE * len(answered):
        return None
    row, source = copied[0]
    return Finding("memorised_answers", "The tuned model repeats training answers",
                   f"{len(copied)} of {len(answered)} tuned answers near-duplicate a training answer; e.g. to "
                   f"{row['question'][:60]!r} it answered {row['prediction'][:80]!r}, a training answer "
                   f"({source[:60]!r}...)",
                   "fewer epochs or a lower train.learning_rate; more varied training answers "
                   "(data.clean.near_dedup drops repeated ones)")


def too_few_steps(optimizer_steps: int, learning_rate: float | None, method: str | None,
                  lora_scale: float | None = None) -> Finding | None:
    """An adapter trained for few optimizer steps at a low learning rate (for LoRA: scaled by alpha / rank, as its
    update is): it barely moved."""
    if method not in ADAPTER_METHODS or not learning_rate or optimizer_steps <= 0:
        return None
    scale = (lora_scale or DEFAULT_LORA_SCALE) / DEFAULT_LORA_SCALE
    budget = optimizer_steps * learning_rate * scale
    if budget >= STEP_BUDGET:
        return None
    scaled = (f" x LoRA alpha/rank {lora_scale:g} over the default {DEFAULT_LORA_SCALE:g}"
              if lora_scale and scale != 1 else "")
    return Finding("too_few_steps", "Too few optimizer steps for the learning rate",
                   f"{optimizer_steps} optimizer steps at learning rate {learning_rate:g} (steps x rate{scaled} = "
                   f"{budget:.4f}, under {STEP_BUDGET:g}): the {method} adapter barely moved from the base",
                   f"raise train.learning_rate ({rate(DEFAULT_LEARNING_RATE)} is the measured default for LoRA on a "
                   "small model) or train more steps: more epochs, or a smaller effective batch "
                   "(per_device_batch_size x gradient_accumulation_steps); about "
                   f"{int(STEP_BUDGET / (learning_rate * scale)) + 1} steps at "
                   f"{learning_rate:g}" + ("; or method.lora_alpha = 2 x method.lora_rank" if scale < 1 else ""))


def set_language(rows: list[dict[str, Any]]) -> str:
    """zh when most references (or questions) of the rows are Chinese, else en."""
    texts = [r.get("reference") or r.get("question", "") for r in rows]
    return "zh" if sum(map(is_chinese, texts)) * 2 >= len(texts) else "en"


def base_degenerate(base_rows_by_set: dict[str, list[dict[str, Any]]]) -> Finding | None:
    """The base model already loops or echoes the question: the starting point is too weak."""
    hits = []
    for name, rows in base_rows_by_set.items():
        answered = [r for r in rows if "prediction" in r]
        bad = [r for r in answered if {"loop", "echo", "empty"} & set(r.get("flags", []))]
        if answered and len(bad) >= DEGENERATE_SHARE * len(answered):
            hits.append((name, len(bad), len(answered), set_language(answered)))
    if not hits:
        return None
    languages = sorted({lang for *_, lang in hits})
    return Finding("base_degenerate", "The base model's answers are degenerate already",
                   "; ".join(f"{bad} of {n} base answers on {name} ({lang}) are loops, echoed questions or empty"
                             for name, bad, n, lang in hits),
                   "the base model is too small or does not support the language: fine-tune a model that fits, "
                   + "; ".join(f"for {lang}: {FITTING_MODELS[lang]}" for lang in languages)
                   + " (model.name_or_path); meanwhile eval.decoding_presets=[repetition_guard] measures the seeds' "
                     "decoding advice")


def template_mismatch(tuned_rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> Finding | None:
    """The tuned model writes chat markup, or runs on to max_new_tokens far more than the base: its turn end
    was not learned or not recognised (a template or end-of-turn token mismatch)."""
    tuned = [r for r in tuned_rows if "prediction" in r]
    base = [r for r in base_rows if "prediction" in r]
    if not tuned:
        return None
    marked = [r for r in tuned if any(m in r["prediction"] for m in MARKUP)]
    run_on = sum("truncated" in r.get("flags", []) for r in tuned) / len(tuned)
    base_run_on = sum("truncated" in r.get("flags", []) for r in base) / len(base) if base else 0.0
    if len(marked) >= MARKUP_SHARE * len(tuned) and marked:
        marker = next(m for m in MARKUP if m in marked[0]["prediction"])
        evidence = f"{len(marked)} of {len(tuned)} tuned answers hold chat markup (e.g. {marker.strip()!r})"
    elif run_on >= RUN_ON_SHARE and run_on - base_run_on >= RUN_ON_MORE:
        evidence = (f"{run_on:.0%} of the tuned answers ran to max_new_tokens without ending the turn "
                    f"(base: {base_run_on:.0%})")
    else:
        return None
    return Finding("template_mismatch", "Template or end-of-turn mismatch", evidence,
                   "train and evaluate with the same data.template; the tuned folder's tokenizer chat_template and "
                   "generation_config.json must end a turn with the token training appended (<|im_end|> for ChatML)")


def eval_leakage(eval_questions: list[str], train_questions: list[str]) -> Finding | None:
    """Eval questions that (near-)duplicate training questions: the scores overstate what was learned."""
    from qatune.config import CleanConfig
    from qatune.data.clean import NearDuplicateIndex

    if not eval_questions or not train_questions:
        return None
    index = NearDuplicateIndex(CleanConfig())
    for i, question in enumerate(train_questions):
        index.add(index.signature(question), str(i))
    leaked = [q for q in eval_questions if index.match(index.signature(q)) is not None]
    if not leaked:
        return None
    return Finding("eval_leakage", "Eval questions leak from the training data",
                   f"{len(leaked)} of {len(eval_questions)} eval questions near-duplicate a training question "
                   f"(e.g. {leaked[0][:60]!r})",
                   "give the eval set as data.eval_sources when preparing (data.clean.eval_leakage then drops the "
                   "leaking training records), or evaluate on questions training never saw")


def diagnose(predictions: dict[str, list[dict[str, Any]]], evidence: TrainingEvidence | None) -> dict[str, Any]:
    """Every check on a base-vs-tuned comparison: {"findings": [...], "notes": [...]}."""
    base, tuned = predictions["base"], predictions["tuned"]
    by_set: dict[str, list[dict[str, Any]]] = {}
    for row in base:
        by_set.setdefault(row["set"], []).append(row)
    found = [base_degenerate(by_set), template_mismatch(tuned, base)]
    notes = []
    if evidence is None:
        notes.append("the tuned model's folder holds no train_report.json: the training checks (loss curves, steps, "
                     "memorisation, leakage) were skipped")
    else:
        notes += evidence.notes
        found += [loss_still_falling(evidence.train_loss, evidence.eval_loss),
                  overfitting(evidence.train_loss, evidence.eval_loss),
                  too_few_steps(evidence.optimizer_steps, evidence.learning_rate, evidence.method, evidence.lora_scale),
                  memorised_answers(tuned, evidence.train_answers),
                  eval_leakage([r["question"] for r in base if "prediction" in r or "correct" in r],
                               evidence.train_questions)]
    return {"findings": [f.as_dict() for f in found if f is not None], "notes": notes}

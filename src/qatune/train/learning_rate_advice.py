"""The learning rate a model's size calls for, said in the train plan before anything loads.

qatune's default train.learning_rate is the one measured best for LoRA on the default model (SmolLM2-135M,
benchmarks/sweep_defaults.py). Larger models want less; the values cited for them (benchmarks/README.md,
"sweep_defaults"):

- LoRA / QLoRA, 1B-13B: 2e-4 (QLoRA, Dettmers et al. 2023, appendix: 2e-4 for 7B and 13B);
  33B and up: 1e-4 (QLoRA: 1e-4 for 33B and 65B).
- Full fine-tuning (and `freeze`, which fully trains its layers): 1e-5 to 2e-5 (Stanford Alpaca, 7B: 2e-5;
  LIMA, 65B: 1e-5).

An embedded model with a LoRA rate measured on it (`MEASURED_LORA`, benchmarks/sweep_defaults.py --model NAME)
gets that rate, not its size's: gemma-3-270m measured best at GEMMA_LORA_RATE (2e-3, as SmolLM2-135M).

Preference training (dpo, kto, orpo, simpo) wants far less than SFT whatever the size: 5e-5 with LoRA, 5e-6
full (LLaMA-Factory's and TRL's DPO examples use 5e-6 to 5e-5; Zephyr's full DPO 5e-7), so only a rate above
that is said (the SFT default left in place would wreck the model). Continued pre-training (pt) and distillation
have customs of their own, and prefix tuning none we measured or cite: their rates are not judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qatune import plugins
from qatune.config.train import TrainConfig
from qatune.models import GEMMA_MODEL
from qatune.train.methods import LORA_METHODS

if TYPE_CHECKING:
    from qatune.config import QatuneConfig

BILLION = 1_000_000_000
LARGE_MODEL = 20 * BILLION  # between QLoRA's 13B (2e-4) and 33B (1e-4)
SPREAD = 2.5  # a learning rate within 2.5x of the suggested one is the same choice (one sweep step: 2e-4 -> 5e-4)
FULL_METHODS = ("full", "freeze")
GEMMA_LORA_RATE = 2e-3  # eval loss 2.87 vs 2.90 at 1e-3, 2.98 at 5e-4, 3.08 at 2e-4 (base 3.23)


@dataclass(frozen=True)
class Suggestion:
    learning_rate: float
    source: str  # where the value comes from, for the warning


# LoRA rates measured on an embedded model by its name (benchmarks/sweep_defaults.py --model NAME, figures in
# benchmarks/README.md): a model's size alone would give gemma-3-270m the 2e-3 measured on SmolLM2-135M.
MEASURED_LORA = {
    GEMMA_MODEL: Suggestion(GEMMA_LORA_RATE, "measured best for LoRA on gemma-3-270m "
                               "(benchmarks/sweep_defaults.py --model gemma-3-270m)"),
}


def model_size(parameters: int) -> str:
    """135M, 7.2B: how a model's size is said."""
    return f"{parameters / BILLION:.1f}B" if parameters >= BILLION else f"{parameters / 1e6:.0f}M"


def rate(value: float) -> str:
    """2e-4, 1.5e-3: a learning rate as configs write it."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def suggested_learning_rate(method: str, parameters: int, model: str | None = None) -> Suggestion | None:
    """The learning rate measured or cited for `method` on `model` (as `model.name_or_path` names it) of
    `parameters`; None where there is none."""
    if method in LORA_METHODS:
        if model in MEASURED_LORA:
            return MEASURED_LORA[model]
        if parameters < BILLION:
            return Suggestion(TrainConfig.model_fields["learning_rate"].default,
                              "measured best for LoRA on SmolLM2-135M (benchmarks/sweep_defaults.py)")
        if parameters < LARGE_MODEL:
            return Suggestion(2e-4, "the value for LoRA/QLoRA on 1B-13B models (QLoRA paper: 2e-4 for 7B and 13B)")
        return Suggestion(1e-4, "the value for LoRA/QLoRA on 33B+ models (QLoRA paper: 1e-4 for 33B and 65B)")
    if method in FULL_METHODS:
        if parameters < LARGE_MODEL:
            return Suggestion(2e-5, "the value for full fine-tuning (1e-5 to 2e-5; Stanford Alpaca 7B: 2e-5)")
        return Suggestion(1e-5, "the value for full fine-tuning of 33B+ models (LIMA 65B: 1e-5)")
    return None


def preference_learning_rate(method: str) -> Suggestion | None:
    """The usual rate of preference training with `method`; None where there is none."""
    if method in LORA_METHODS:
        return Suggestion(5e-5, "the usual rate for preference training with LoRA (DPO examples: 5e-6 to 5e-5)")
    if method in FULL_METHODS:
        return Suggestion(5e-6, "the usual rate for full preference training (DPO examples: 5e-7 to 5e-6)")
    return None


def learning_rate_warning(method: str, stage: str, learning_rate: float, parameters: int | None,
                          model: str | None = None) -> str | None:
    """A warning when `learning_rate` is more than SPREAD times off the one suggested for this model size (for
    preference stages: more than SPREAD times above the usual rate). The stage's plug-in says which advice applies
    (`learning_rate_advice`: the measured and cited values are SFT values)."""
    advice = plugins.load("stage", stage).learning_rate_advice
    if advice == "preference":
        suggestion = preference_learning_rate(method)
        if suggestion is None or learning_rate <= suggestion.learning_rate * SPREAD:
            return None
        return (f"train.learning_rate={rate(learning_rate)} looks high for {stage} with method {method}: "
                f"{rate(suggestion.learning_rate)} is {suggestion.source}; set "
                f"train.learning_rate={rate(suggestion.learning_rate)}")
    if parameters is None or advice != "sft":
        return None
    suggestion = suggested_learning_rate(method, parameters, model)
    if suggestion is None:
        return None
    suggested = suggestion.learning_rate
    if suggested / SPREAD <= learning_rate <= suggested * SPREAD:
        return None
    direction = "high" if learning_rate > suggested else "low"
    return (f"train.learning_rate={rate(learning_rate)} looks {direction} for a {model_size(parameters)}-parameter "
            f"model with method {method}: {rate(suggested)} is {suggestion.source}; set "
            f"train.learning_rate={rate(suggested)}, or "
            "keep yours if you measured it (`qatune tune` searches it)")


def plan_warnings(config: QatuneConfig) -> list[str]:
    """What the train plan says about this config's hyper-parameters for its model's size (reads no weights)."""
    from qatune.models import parameter_count

    stage, method = config.train.stage, config.method.name
    advice = plugins.load("stage", stage).learning_rate_advice
    if advice is None or method not in LORA_METHODS + FULL_METHODS:
        return []  # nothing to say: do not read the model's config
    parameters = parameter_count(config.model) if advice == "sft" else None  # preference: size-free
    warning = learning_rate_warning(method, stage, config.train.learning_rate, parameters, config.model.name_or_path)
    return [warning] if warning else []

"""`train.stage: dpo`: Direct Preference Optimization on (prompt, chosen, rejected) pairs (TRL's DPOTrainer),
against the base with the adapter switched off (LoRA) or precomputed log-probabilities (full, freeze). Loss
variants in `preference.loss_type`; `preference.sft_weight` adds RPO's cross-entropy on the chosen answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.train.stages.preference import PreferenceStage

if TYPE_CHECKING:
    from qatune.config import QatuneConfig


class DpoStage(PreferenceStage):
    def trl_arguments(self, config: "QatuneConfig", precompute_reference: bool) -> dict[str, Any]:
        pref = config.preference
        losses, weights = [pref.loss_type], [1.0]
        if pref.sft_weight:
            losses, weights = losses + ["sft"], weights + [pref.sft_weight]
        return {"beta": self.beta(config), "loss_type": losses, "loss_weights": weights,
                "label_smoothing": pref.label_smoothing, "precompute_ref_log_probs": precompute_reference}


PLUGIN = DpoStage("dpo", default_beta=0.1, reference_model=True, prompt_once=True,
                  trl_classes=("trl", "DPOConfig", "DPOTrainer"))

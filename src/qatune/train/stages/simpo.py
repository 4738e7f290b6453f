"""`train.stage: simpo`: SimPO (TRL's experimental CPOTrainer with loss_type simpo): a length-normalised reward
with a target margin `preference.simpo_gamma`; no reference model. `preference.sft_weight` is CPO's
behaviour-cloning term (0: pure SimPO)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.train.stages.preference import PreferenceStage

if TYPE_CHECKING:
    from qatune.config import QatuneConfig


class SimpoStage(PreferenceStage):
    def trl_arguments(self, config: "QatuneConfig", precompute_reference: bool) -> dict[str, Any]:
        pref = config.preference
        return {"beta": self.beta(config), "loss_type": "simpo", "simpo_gamma": pref.simpo_gamma,
                "cpo_alpha": pref.sft_weight, "label_smoothing": pref.label_smoothing}


PLUGIN = SimpoStage("simpo", default_beta=2.0, trl_classes=("trl.experimental.cpo", "CPOConfig", "CPOTrainer"))

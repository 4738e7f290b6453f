"""`train.stage: orpo`: Odds Ratio Preference Optimization (TRL's experimental ORPOTrainer): the chosen answer's
cross-entropy plus an odds-ratio term weighted by `preference.beta` (lambda); no reference model."""

from __future__ import annotations

from qatune.train.stages.preference import PreferenceStage

PLUGIN = PreferenceStage("orpo", default_beta=0.1, trl_classes=("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"))

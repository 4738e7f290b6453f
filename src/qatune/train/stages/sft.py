"""`train.stage: sft`: supervised fine-tuning on conversations, the loss on the answers. The base stage's
behaviour as it is: conversations rendered with the chat template, assistant tokens labelled."""

from __future__ import annotations

from qatune.train.stages.base import TrainingStage

PLUGIN = TrainingStage("sft")

"""The whole config: one section per stage."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, field_validator

from qatune.config.base import Section
from qatune.config.data import DataConfig
from qatune.config.deploy import ExportConfig, ServeConfig
from qatune.config.eval import EvalConfig
from qatune.config.model import MethodConfig, ModelConfig
from qatune.config.synth import AugmentConfig, FromDocsConfig
from qatune.config.train import TrainConfig, TuneConfig


class QatuneConfig(Section):
    """The whole resolved config: one section per stage."""

    data: DataConfig = Field(default_factory=DataConfig, description="Data preparation.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model, tokenizer and chat template.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Fine-tuning method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export.")
    from_docs: FromDocsConfig = Field(default_factory=FromDocsConfig, description="Q&A pairs from documents.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Question paraphrases.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyper-parameter search.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name_or_path": v} if isinstance(v, str) else v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

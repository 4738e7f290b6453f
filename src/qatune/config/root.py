"""The whole config: one section per stage, and its form for files (secrets withheld)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, Field, field_validator

from qatune.config.base import Section, is_secret
from qatune.config.data import DataConfig
from qatune.config.deploy import ExportConfig, ServeConfig
from qatune.config.eval import EvalConfig
from qatune.config.model import MethodConfig, ModelConfig
from qatune.config.synth import AnswerConfig, AugmentConfig, EndpointConfig, FromDocsConfig
from qatune.config.train import DistillConfig, FeedbackConfig, PreferenceConfig, TrainConfig, TuneConfig


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
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation (train.stage distill).")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="Preference training "
                                         "(train.stage dpo, kto, orpo, simpo).")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Review-sheet scores as training "
                                     "data (qatune data feedback).")
    answer: AnswerConfig = Field(default_factory=AnswerConfig, description="Answers to a question list by a teacher.")
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig, description="An OpenAI-compatible endpoint "
                                     "that writes data (from-docs, augment, answer) in place of the local model.")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name_or_path": v} if isinstance(v, str) else v

    def file_dump(self) -> dict[str, Any]:
        """`model_dump(mode="json")` for anything written to a file or shown: every secret field
        (`qatune.config.base.is_secret`) left out, and the password of any `scheme://user:password@`
        URL masked. The config in memory keeps them."""
        return _mask_urls(_withhold(self, self.model_dump(mode="json"), "", []))

    def withheld_secrets(self) -> list[str]:
        """The dotted keys of the secret fields that are set (their values are never written)."""
        withheld: list[str] = []
        _withhold(self, self.model_dump(mode="json"), "", withheld)
        return withheld

    def to_yaml(self) -> str:
        """The config as YAML (config.yaml beside every output), secrets withheld: a comment names each
        one that was set, to give again on the command line or in the environment."""
        text = yaml.safe_dump(self.file_dump(), sort_keys=False, allow_unicode=True)
        withheld = self.withheld_secrets()
        if withheld:
            text = (f"# Secrets withheld (set, not written): {', '.join(withheld)}. Give them again as "
                    "key=value or in the environment.\n" + text)
        return text


# scheme://user:password@host: the password part
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:\s]*):([^/?#@\s]+)@")


def _withhold(model: BaseModel, tree: dict[str, Any], prefix: str, withheld: list[str]) -> dict[str, Any]:
    """`tree` (model's dump) without its secret fields, in place; the set ones' keys go to `withheld`."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if is_secret(name, info):
            tree.pop(name, None)
            if value is not None:
                withheld.append(prefix + name)
        elif isinstance(value, BaseModel):
            _withhold(value, tree[name], f"{prefix}{name}.", withheld)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _withhold(item, tree[name][i], f"{prefix}{name}[{i}].", withheld)
    return tree


def mask_url_password(url: str) -> str:
    """`scheme://user:***@host/...` for `scheme://user:password@host/...`; any other text as it is."""
    return _URL_PASSWORD.sub(r"\1:***@", url)


def _mask_urls(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _mask_urls(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_mask_urls(value) for value in tree]
    return mask_url_password(tree) if isinstance(tree, str) else tree

"""The one config schema: data / model / method / train / eval / serve / export / from_docs / augment / tune.

Every key has its default and description in this package, and nowhere else. Unknown keys are
errors (a misspelt key must never be silently ignored), and `load_config` reports every problem at
once: the key as written, the line in the YAML file, the bad value, the expected type and, for a
misspelling, the closest valid key. `docs/config.md` is generated from these modules.
"""

from qatune.config.base import DecodingConfig, Section
from qatune.config.data import (
                                NAMED_TEMPLATES,
                                SOURCE_FORMATS,
                                CleanConfig,
                                DataConfig,
                                SharegptTags,
                                SourceConfig,
)
from qatune.config.deploy import ExportConfig, ServeConfig
from qatune.config.eval import EvalConfig
from qatune.config.loading import load_config
from qatune.config.model import MethodConfig, ModelConfig
from qatune.config.reference import config_reference
from qatune.config.root import QatuneConfig
from qatune.config.schema import type_name
from qatune.config.synth import AnswerConfig, AugmentConfig, EndpointConfig, FromDocsConfig
from qatune.config.train import DistillConfig, TrainConfig, TuneConfig

__all__ = [
    "NAMED_TEMPLATES", "SOURCE_FORMATS", "AnswerConfig", "AugmentConfig", "DistillConfig", "EndpointConfig", "CleanConfig", "DataConfig", "DecodingConfig",
    "EvalConfig", "ExportConfig", "FromDocsConfig", "MethodConfig", "ModelConfig", "QatuneConfig", "Section",
    "ServeConfig", "SharegptTags", "SourceConfig", "TrainConfig", "TuneConfig", "config_reference",
    "load_config", "type_name",
]

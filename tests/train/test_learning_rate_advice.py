"""The train plan says when the model's size calls for another learning rate: model sizes read from configs
alone (Llama-2-7B's and SmolLM2-135M's shapes, no weights), the warning naming size, value and suggestion."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from qatune.config import ModelConfig, TrainConfig, load_config
from qatune.models import parameter_count
from qatune.runtime import Runtime
from qatune.train.learning_rate_advice import learning_rate_warning, plan_warnings, suggested_learning_rate
from qatune.train.run import plan
from tests.conftest import tiny_config

LLAMA2_7B = 6_738_415_616  # the published parameter count of Llama-2-7B
SMOLLM2_135M = 134_515_008  # the default model's, as its GGUF file's tensors add up
DEFAULT_LEARNING_RATE = TrainConfig.model_fields["learning_rate"].default


def config_only_folder(path, **shape):
    """A model folder with a config.json and no weights."""
    from transformers import LlamaConfig

    LlamaConfig(**shape).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory):
    return config_only_folder(tmp_path_factory.mktemp("llama-7b"), hidden_size=4096, intermediate_size=11008,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


def test_parameter_count_reads_the_config_not_the_weights(llama_7b, tmp_path) -> None:
    assert parameter_count(ModelConfig(name_or_path=str(llama_7b))) == LLAMA2_7B
    smol = config_only_folder(tmp_path / "smol", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    assert parameter_count(ModelConfig(name_or_path=str(smol))) == SMOLLM2_135M
    adapter = tmp_path / "adapter"  # an earlier lora run as the model: its base's size
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                             "base_model_name_or_path": str(llama_7b)}))
    assert parameter_count(ModelConfig(name_or_path=str(adapter))) == LLAMA2_7B
    assert parameter_count(ModelConfig(name_or_path="nobody/not-cached-here")) is None  # no download to find out


def test_the_small_model_rate_on_a_7b_and_the_7b_rate_on_a_small_model_are_said() -> None:
    high = learning_rate_warning("lora", "sft", 2e-3, LLAMA2_7B)
    assert high is not None and "6.7B-parameter" in high and "looks high" in high
    assert "train.learning_rate=2e-3" in high and "set train.learning_rate=2e-4" in high and "QLoRA" in high
    low = learning_rate_warning("lora", "sft", 2e-5, SMOLLM2_135M)
    assert low is not None and "135M-parameter" in low and "looks low" in low and "sweep_defaults" in low
    full = learning_rate_warning("full", "sft", 2e-4, LLAMA2_7B)
    assert full is not None and "set train.learning_rate=2e-5" in full
    assert "1e-4" in learning_rate_warning("qlora", "sft", 1e-3, 65_000_000_000)


def test_rates_that_fit_the_size_stay_quiet() -> None:
    assert learning_rate_warning("lora", "sft", 2e-4, LLAMA2_7B) is None
    assert learning_rate_warning("full", "sft", 1e-5, LLAMA2_7B) is None
    small = suggested_learning_rate("lora", SMOLLM2_135M)
    assert small is not None and small.learning_rate == DEFAULT_LEARNING_RATE  # the measured default
    assert learning_rate_warning("lora", "sft", DEFAULT_LEARNING_RATE, SMOLLM2_135M) is None
    # Stages and methods with customs of their own, and a size not known here, are not judged.
    assert learning_rate_warning("full", "dpo", 5e-7, LLAMA2_7B) is None  # Zephyr's: low, and said by no one
    assert learning_rate_warning("lora", "distill", 1.0, LLAMA2_7B) is None
    assert learning_rate_warning("lora", "pt", 5e-4, SMOLLM2_135M) is None  # examples/multistage/1_pt.yaml's
    assert learning_rate_warning("prefix", "sft", 1e-2, LLAMA2_7B) is None
    assert learning_rate_warning("lora", "sft", 1.0, None) is None


def test_the_default_model_with_the_defaults_is_not_warned() -> None:
    assert plan_warnings(load_config(None, [])) == []


def test_the_train_plan_says_it_before_training(tmp_path, llama_7b, qa_file) -> None:
    def planned(*overrides: str) -> str:
        out = io.StringIO()
        plan(tiny_config(tmp_path, llama_7b, qa_file, *overrides), Runtime.detect(Console(file=out, width=400)))
        return out.getvalue()

    said = planned("train.learning_rate=2e-3")
    assert "6.7B-parameter model with method lora" in said and "set train.learning_rate=2e-4" in said
    assert "learning_rate" not in planned("train.learning_rate=2e-4")
    assert not (tmp_path / "run").exists()  # said in the plan: nothing written, no weights needed


def test_preference_training_left_at_the_sft_rate_is_said() -> None:
    high = learning_rate_warning("lora", "dpo", DEFAULT_LEARNING_RATE, None)
    assert high is not None and "looks high for dpo" in high and "set train.learning_rate=5e-5" in high
    assert "set train.learning_rate=5e-6" in learning_rate_warning("full", "simpo", 1e-4, SMOLLM2_135M)
    assert learning_rate_warning("lora", "kto", 5e-5, None) is None
    assert plan_warnings(load_config(None, ["train.stage=dpo"])) == [high]
    assert plan_warnings(load_config(None, ["train.stage=dpo", "train.learning_rate=5e-5"])) == []

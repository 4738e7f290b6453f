"""The training stage end to end on a tiny random Llama: loss falls, every method trains, saves and
loads back, outputs and report are written, and bad set-ups stop with a named error."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.config import ModelConfig
from qatune.errors import ConfigError
from qatune.models import load_model
from qatune.reports import report_json
from qatune.runtime import Runtime
from qatune.train.methods import MethodError
from qatune.train.run import TrainError, complete_checkpoints, train
from tests.conftest import tiny_config

AUTO = Runtime.detect().dtype(ModelConfig())  # model.dtype=auto here


def state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_falls_and_report_is_complete(tmp_path, tiny_model_dir, qa_file) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, "method.name=full",
                         "train.num_epochs=4", "train.learning_rate=2e-3", "train.report_to=tensorboard",
                         "train.preview_questions=2", "eval.decoding.max_new_tokens=8")
    result = train(config)
    report = result.report
    assert report.eval_loss.final_eval_loss < report.eval_loss.initial_eval_loss - 0.5
    train_losses = [e["loss"] for e in json.loads((result.output_dir / "checkpoint-" f"{report.global_step}" /
                                                   "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert report.eval_loss.best_eval_loss <= report.eval_loss.final_eval_loss
    assert report.eval_loss.initial_eval_perplexity == pytest.approx(torch.tensor(report.eval_loss.initial_eval_loss).exp().item())
    assert report.tokens_seen > 0 and report.tokens_per_s > 0 and report.peak_memory_mib["process_rss"] > 0
    assert report.global_step == 4 * 5  # 18 train samples / batch 4 = 5 steps per epoch
    out = result.output_dir
    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml",
                 "generation_config.json", "loss_curve.png", "train_report.json"):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    assert json.loads((out / "train_report.json").read_text())["final_eval_loss"] == report.eval_loss.final_eval_loss
    # The tuned model stops at the template's end-of-turn, not only at eos.
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]
    assert [set(row) for row in result.preview] == [{"prompt", "question", "reference", "base", "tuned"}] * 2
    # Best and last checkpoints are kept within save_total_limit.
    assert 1 <= len(complete_checkpoints(out)) <= 2


@pytest.mark.parametrize("method", ["lora", "full", "freeze", "prefix"])
def test_each_method_trains_two_steps_saves_and_loads_back(tmp_path, tiny_model_dir, qa_file, method) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = tiny_config(tmp_path, tiny_model_dir, qa_file, f"method.name={method}", "train.max_steps=2")
    result = train(config)
    assert result.report.global_step == 2
    out = result.output_dir
    base = state_dict(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32))
    probe = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        base_logits = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), AUTO)(probe).logits
    if method in ("lora", "prefix"):
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
        model = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), AUTO), str(out))
        if method == "lora":  # B starts at zero: every trained B moved
            lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
            assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    else:
        assert (out / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(str(out))
        tuned = state_dict(model)
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        if method == "full":
            assert changed == set(base) - {"lm_head.weight"} or changed == set(base)
        else:  # freeze: the last two of four layers only, embeddings untouched
            assert changed and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in changed)
    with torch.no_grad():
        assert not torch.allclose(model(probe).logits.float(), base_logits.float()), "the trained model answers differently"


def test_second_run_reuses_prepared_data_and_refuses_to_mix_runs(tmp_path, tiny_model_dir, qa_file) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=1")
    assert train(config).report.data_reused is False
    with pytest.raises(TrainError, match="already holds a run") as info:
        train(config)
    assert "train.resume=true" in str(info.value) and "overwrite_output_dir" in str(info.value)
    again = tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=1", "train.overwrite_output_dir=true")
    assert train(again).report.data_reused is True


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_model_dir, qa_file) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, "train.resume=true")
    with pytest.raises(TrainError, match="no complete checkpoint"):
        train(config)


def test_resume_with_a_changed_config_names_the_keys(tmp_path, tiny_model_dir, qa_file) -> None:
    train(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=2", "train.save_steps=1"))
    changed = tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=4", "train.save_steps=1",
                          "train.resume=true", "train.learning_rate=5e-3", "method.lora_rank=8")
    with pytest.raises(TrainError, match="cannot resume") as info:
        train(changed)
    assert "train.learning_rate: 0.001 -> 0.005" in str(info.value) and "method.lora_rank" in str(info.value)
    assert "max_steps" not in str(info.value)  # extending a run is allowed


def test_hardware_and_setup_errors_come_before_loading(tmp_path, tiny_model_dir, qa_file, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec  # qlora where bitsandbytes is not installed
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
        with pytest.raises(MethodError, match="method qlora needs the bitsandbytes package"):
            train(tiny_config(tmp_path, tiny_model_dir, qa_file, "method.name=qlora"))
    with pytest.raises(TrainError, match="fp16 on CPU"):
        train(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.precision=fp16"))
    with pytest.raises(ConfigError, match="early_stopping_patience: needs eval data"):
        tiny_config(tmp_path, tiny_model_dir, qa_file, "data.val_size=0", "train.early_stopping_patience=2")
    assert not (tmp_path / "run").exists()


def test_config_errors_name_key_and_fix(tmp_path, tiny_model_dir, qa_file) -> None:
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, tiny_model_dir, qa_file, "method.name=adapter", "train.lerning_rate=1")
    text = str(info.value)
    assert text.startswith("2 problems") and "method.name" in text and "'lora'" in text
    assert "did you mean 'learning_rate'" in text
    with pytest.raises(ConfigError) as info:  # cross-key checks run once every key is valid
        tiny_config(tmp_path, tiny_model_dir, qa_file, "train.save_steps=5", "train.eval_steps=2")
    assert "save_steps=5 is not a multiple of eval_steps=2" in str(info.value)
    assert "train.save_steps=2" in str(info.value)


def test_early_stopping_stops_when_eval_loss_stalls(tmp_path, tiny_model_dir, qa_file) -> None:
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, "train.max_steps=30", "train.eval_steps=1",
                         "train.learning_rate=1e-9", "train.early_stopping_patience=2",
                         "train.early_stopping_threshold=0.01")
    report = train(config).report
    assert report.stopped_early and report.global_step <= 4


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_paths_train_exactly_like_the_plain_path(tmp_path, tiny_model_dir, qa_file, method) -> None:
    """Padding-free rows and the chunked loss change how a step is computed, not what it computes:
    same losses, same tokens counted, same weights (fp32, dropout off: the masks would differ)."""
    from safetensors.torch import load_file

    common = (f"method.name={method}", "method.lora_dropout=0", "train.max_steps=3", "train.precision=fp32",
              "train.eval_at_start=true", "train.learning_rate=" + ("1e-3" if method == "lora" else "1e-4"))
    fast = train(tiny_config(tmp_path / "fast", tiny_model_dir, qa_file, *common))
    plain = train(tiny_config(tmp_path / "plain", tiny_model_dir, qa_file, *common, "train.padding_free=false",
                              "train.chunked_loss=false", "train.lean_dropout=false"))
    assert fast.report.tokens_seen == plain.report.tokens_seen > 0  # non-padding tokens, counted alike
    for key in ("initial_eval_loss", "final_eval_loss", "final_train_loss"):
        assert report_json(fast.report)[key] == pytest.approx(report_json(plain.report)[key], abs=2e-5), key
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    fast_weights, plain_weights = (load_file(str(r.output_dir / weights)) for r in (fast, plain))
    assert fast_weights.keys() == plain_weights.keys()
    for name, tensor in fast_weights.items():
        torch.testing.assert_close(tensor, plain_weights[name], atol=2e-5, rtol=1e-4, msg=name)

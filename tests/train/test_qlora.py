"""QLoRA and the bitsandbytes optimisers on the CPU backend (bitsandbytes >= 0.50): a 4-bit NF4 base
trains, its adapter saves, loads back on the base and merges into the unquantized base; its eval loss
stays near lora's on the same data; every offered train.optimizer trains; and what cannot run on the
device in use is refused before loading, with the reason."""

from __future__ import annotations

import io
import time

import pytest
import torch
from rich.console import Console

from qatune.config import ModelConfig, load_config
from qatune.models import load_model
from qatune.runtime import Runtime
from qatune.train.arguments import OPTIMIZERS, check_optimizer
from qatune.train.run import TrainError, train
from tests.conftest import tiny_config

pytest.importorskip("bitsandbytes", reason="qlora and the 8-bit optimisers need bitsandbytes (pip install 'qatune[qlora]')")

AUTO = Runtime.detect().dtype(ModelConfig())
PROBE = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
# qlora vs lora, same data, seed and 10 steps at lr 5e-3: NF4 rounds the base's weights (blocks of 64,
# double-quantized absmax), so both the start and the end differ by that rounding; what the adapter
# learns must be nearly the same: qlora's fall in eval loss within 25% of lora's, and the final losses
# within a quarter of lora's fall of each other.
QLORA_VS_LORA = 0.25


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits.float()


def test_qlora_trains_saves_loads_back_and_merges(tmp_path, tiny_model_dir, qa_file) -> None:
    from peft import PeftModel

    from qatune.export.run import export

    result = train(tiny_config(tmp_path, tiny_model_dir, qa_file, "method.name=qlora", "train.max_steps=2"))
    assert result.report.global_step == 2
    out = result.output_dir
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    base_cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    base = _logits(load_model(base_cfg, torch.float32))
    # The adapter on the unquantized base: every lora_B moved from its zero start.
    on_base = PeftModel.from_pretrained(load_model(base_cfg, torch.float32), str(out))
    lora_b = [p for n, p in on_base.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    with_adapter = _logits(on_base)
    assert not torch.allclose(with_adapter, base)
    # The output folder as a model: base + adapter merged (what a next stage trains on).
    merged = _logits(load_model(ModelConfig(name_or_path=str(out)), torch.float32))
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)
    # Export without --quantize merges into the fp32 base and checks the answers token for token.
    exported = export(load_config(None, [f"model={tiny_model_dir}", f"export.adapter={out}",
                                         f"export.output_dir={tmp_path / 'export'}", "export.dtype=float32"]),
                      Runtime(device="cpu", console=Console(file=io.StringIO())))
    merged_check = exported.report.checks["merged"]
    assert merged_check["identical"] == merged_check["questions"]
    torch.testing.assert_close(_logits(load_model(ModelConfig(name_or_path=str(tmp_path / "export")),
                                                  torch.float32)), with_adapter, atol=1e-4, rtol=1e-4)


def test_qlora_eval_loss_is_near_loras(tmp_path, tiny_model_dir, qa_file) -> None:
    reports, seconds = {}, {}
    for method in ("lora", "qlora"):
        started = time.perf_counter()
        reports[method] = train(tiny_config(tmp_path / method, tiny_model_dir, qa_file, f"method.name={method}",
                                            "train.max_steps=10", "train.eval_steps=10",
                                            "train.learning_rate=5e-3")).report.eval_loss
        seconds[method] = time.perf_counter() - started
    fall = {m: r.initial_eval_loss - r.final_eval_loss for m, r in reports.items()}
    print(f"eval loss after 10 steps: lora {reports['lora'].final_eval_loss:.4f} (fell {fall['lora']:.4f}), "
          f"qlora {reports['qlora'].final_eval_loss:.4f} (fell {fall['qlora']:.4f}); "
          f"run wall time lora {seconds['lora']:.1f} s, qlora {seconds['qlora']:.1f} s")
    assert fall["lora"] > 0.1
    assert fall["qlora"] == pytest.approx(fall["lora"], rel=QLORA_VS_LORA)
    assert abs(reports["qlora"].final_eval_loss - reports["lora"].final_eval_loss) < QLORA_VS_LORA * fall["lora"]


def _here_optimizers() -> list[str]:
    device = Runtime.detect().device
    return [name for name, (_, cuda) in OPTIMIZERS.items() if device == "cuda" or not cuda]


# The class each train.optimizer reaches the Trainer as (accelerate wraps it; this is the inner one).
OPTIMIZER_CLASSES = {"adamw_torch": "torch.AdamW", "adamw_torch_fused": "torch.AdamW",
                     "adafactor": "transformers.Adafactor", "sgd": "torch.SGD", "adamw_8bit": "bitsandbytes.AdamW",
                     "lion_8bit": "bitsandbytes.Lion", "paged_adamw_8bit": "bitsandbytes.PagedAdamW"}


@pytest.mark.parametrize("optimizer", _here_optimizers())
def test_each_offered_optimizer_trains_two_steps(tmp_path, tiny_model_dir, qa_file, optimizer) -> None:
    from transformers import TrainerCallback

    seen = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)
            seen["class"] = f"{type(inner).__module__.split('.')[0]}.{type(inner).__name__}"
            seen["fused"] = inner.defaults.get("fused")
            # bitsandbytes keeps 8-bit (uint8) moments for tensors of 4096+ elements: the embedding here
            seen["uint8"] = any(v.dtype == torch.uint8 for st in inner.state.values() for v in st.values()
                                if torch.is_tensor(v))

    # full fine-tuning: the embedding is large enough for bitsandbytes' 8-bit state (lora's tiny A/B stay fp32)
    result = train(tiny_config(tmp_path, tiny_model_dir, qa_file, "method.name=full", f"train.optimizer={optimizer}",
                               "train.max_steps=2", "train.eval_steps=2"), callbacks=[Record()])
    assert result.report.global_step == 2
    assert seen["class"] == OPTIMIZER_CLASSES[optimizer]
    assert seen["fused"] is (True if optimizer == "adamw_torch_fused" else seen["fused"])
    assert seen["uint8"] is optimizer.endswith("_8bit")
    base = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.float32).state_dict()
    tuned = load_model(ModelConfig(name_or_path=str(result.output_dir)), torch.float32).state_dict()
    assert not torch.equal(base["model.layers.0.self_attn.q_proj.weight"], tuned["model.layers.0.self_attn.q_proj.weight"])


def test_optimizer_the_device_cannot_run_is_refused_before_loading(tmp_path, tiny_model_dir, qa_file,
                                                                   monkeypatch) -> None:
    with pytest.raises(TrainError, match="no CUDA GPU") as info:
        check_optimizer("paged_adamw_8bit", "cpu")
    assert "train.optimizer=adamw_8bit" in str(info.value)
    check_optimizer("paged_adamw_8bit", "cuda")
    check_optimizer("adamw_torch_fused", "cpu")  # torch 2.13's fused AdamW has a CPU kernel
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TrainError, match="needs the bitsandbytes package") as info:
        check_optimizer("adamw_8bit", "cpu")
    assert "qatune[qlora]" in str(info.value)
    check_optimizer("adamw_torch", "cpu")
    monkeypatch.undo()
    with pytest.raises(TrainError, match="no CUDA GPU"):  # the train plan refuses it before anything loads
        train(tiny_config(tmp_path, tiny_model_dir, qa_file, "train.optimizer=paged_adamw_8bit"), Runtime(device="cpu"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_8bit_optimizer_state_is_a_quarter_of_adamws() -> None:
    """Optimiser state bytes for the same parameters after one step (block-wise 8-bit vs fp32 moments).
    Earlier trainings in this process (8-bit optimizer tests above) left no overrides behind
    (compat.bitsandbytes.optimizer_overrides_scoped): nothing is reset here."""
    import bitsandbytes as bnb

    def state_bytes(make) -> int:
        torch.manual_seed(0)
        layer = torch.nn.Linear(1024, 1024, bias=False)
        opt = make(layer.parameters())
        layer(torch.randn(2, 1024)).pow(2).mean().backward()
        opt.step()
        return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))

    fp32 = state_bytes(lambda p: torch.optim.AdamW(p, lr=1e-3))
    int8 = state_bytes(lambda p: bnb.optim.AdamW8bit(p, lr=1e-3))
    assert fp32 == pytest.approx(8 * 1024 * 1024, rel=0.01)
    assert int8 < 0.27 * fp32


def test_qlora_base_passes_gradients_after_an_eval_forward(tiny_model_dir) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel (no backward) on the first eval-mode
    forward; qlora's model must still pass gradients to the first layer's adapter after one."""
    from qatune.config import MethodConfig
    from qatune.train.methods import apply_method, load_for_method

    method = MethodConfig(name="qlora")
    model = apply_method(load_for_method(ModelConfig(name_or_path=str(tiny_model_dir)), method, AUTO, "cpu"),
                         method, False)
    model.eval()
    with torch.no_grad():
        model(PROBE)
    model.train()
    model(PROBE, labels=PROBE).loss.backward()
    first = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert first.grad is not None and first.grad.abs().sum() > 0

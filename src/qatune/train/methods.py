"""lora / qlora / full / freeze / prefix: a loaded model in, a model with the right parameters
trainable out. The method is a config field; everything else in training is shared."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qatune.config import MethodConfig, ModelConfig
from qatune.errors import QatuneError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

LORA_METHODS = ("lora", "qlora")  # low-rank adapters (rank, alpha, target modules)
ADAPTER_METHODS = (*LORA_METHODS, "prefix")  # the base stays frozen: a run saves an adapter


class MethodError(QatuneError):
    """The chosen method cannot run here or does not fit the model."""


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.3f}%)"


# bitsandbytes runs 4-bit NF4 (Linear4bit forward and backward) on a CPU from its multi-backend
# releases on; 0.50.2 is the version verified here (the PyPI wheel ships libbitsandbytes_cpu.so). On the
# default model the 4-bit base loads on the CPU in 8 s with a 104 MiB footprint (vs ~540 MiB fp32).
BNB_CPU_MIN = "0.50"


def bitsandbytes_problem(device: str, what: str) -> tuple[str, str] | None:
    """Why bitsandbytes cannot run `what` on `device` (message, fix), or None where it can."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"{what} needs the bitsandbytes package, which is not installed",
                f"pip install 'qatune[qlora]' (bitsandbytes>={BNB_CPU_MIN}, CPU and CUDA)")
    if device == "cpu":
        from importlib.metadata import version

        from packaging.version import Version

        have = version("bitsandbytes")
        if Version(have) < Version(BNB_CPU_MIN):
            message = f"{what} on CPU needs bitsandbytes>={BNB_CPU_MIN} (its CPU backend); bitsandbytes {have} is installed"
            return message, f"pip install -U 'bitsandbytes>={BNB_CPU_MIN}', or run on a CUDA GPU"
    return None


def check_method_here(method: MethodConfig, device: str) -> None:
    """Refuse at once, before any weight is read, what this machine cannot do."""
    if method.name == "qlora":
        problem = bitsandbytes_problem(device, "method qlora")
        if problem:
            raise MethodError(problem[0], hint=f"{problem[1]}; or use method.name=lora (same adapters, "
                                               "unquantized base)")


def load_for_method(model_cfg: ModelConfig, method: MethodConfig, precision: "torch.dtype",
                    device: str) -> "PreTrainedModel":
    """Load the base model the way the method wants it.

    Adapter methods keep the frozen base in the compute dtype (half the memory, and the adapter
    weights stay fp32); full and freeze keep fp32 master weights and let autocast compute in
    bf16/fp16. qlora loads the base as 4-bit NF4 with double quantization, computing in `precision` (the
    Runtime's: fp32 on a CPU without native bf16, where emulated bf16 is ~100x slower)."""
    import torch

    from qatune.models import load_model

    kwargs: dict[str, Any] = {}
    if method.name == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision,
        )
        # The 4-bit weights live where they compute: bitsandbytes' CPU backend, or this process's GPU.
        kwargs["device_map"] = {"": torch.cuda.current_device()} if device.startswith("cuda") else device
    if model_cfg.dtype != "auto":
        dtype = getattr(torch, model_cfg.dtype)
    else:
        dtype = precision if method.name in ADAPTER_METHODS else torch.float32
    return load_model(model_cfg, dtype=dtype, **kwargs)


def apply_method(model: "PreTrainedModel", method: MethodConfig, gradient_checkpointing: bool) -> "PreTrainedModel":
    """Make exactly the parameters the method trains trainable; return the (possibly wrapped) model."""
    if gradient_checkpointing:
        # use_reentrant=False works with frozen embeddings (no need for enable_input_require_grads).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question on every wrap; the user can do nothing about it.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if method.name in LORA_METHODS:
            return _lora(model, method, gradient_checkpointing)
        if method.name == "prefix":
            return _prefix(model, method)
    if method.name == "freeze":
        _freeze(model, method)
    else:  # full
        model.requires_grad_(True)
    return model


def _lora(model: "PreTrainedModel", method: MethodConfig, gradient_checkpointing: bool) -> "PreTrainedModel":
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qatune.compat.bitsandbytes import keep_4bit_weights_differentiable

    if method.name == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_4bit_weights_differentiable(model)
    targets = method.target_modules
    if targets != "all-linear":
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if type(m).__name__.startswith("Linear") and "lm_head" not in n})
            raise MethodError(f"method.target_modules {missing} are not modules of this model",
                              hint=f"choose among {linear}, or use target_modules=all-linear")
    config = LoraConfig(
        r=method.lora_rank, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
        target_modules=targets, use_rslora=method.use_rslora, use_dora=method.use_dora,
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _prefix(model: "PreTrainedModel", method: MethodConfig) -> "PreTrainedModel":
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=method.prefix_virtual_tokens,
                                                    task_type="CAUSAL_LM"))


def _freeze(model: "PreTrainedModel", method: MethodConfig) -> None:
    """Train the last N decoder layers, or the named modules; embeddings stay frozen (tied lm_head
    too) unless a name asks for them."""
    model.requires_grad_(False)
    names = [name for name, _ in model.named_parameters()]
    if method.freeze_trainable_modules:
        patterns = [re.compile(rf"(^|\.){re.escape(m)}(\.|$)") for m in method.freeze_trainable_modules]
        chosen = [n for n in names if any(p.search(n) for p in patterns)]
        if not chosen:
            raise MethodError(f"method.freeze_trainable_modules {method.freeze_trainable_modules} match no parameter",
                              hint=f"names look like {names[len(names) // 2]!r}; try ['mlp'] or ['layers.29']")
    else:
        layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))})
        if not layers:
            raise MethodError("method freeze: this model has no `.layers.N.` decoder layers to pick from",
                              hint="name the modules to train in method.freeze_trainable_modules")
        if method.freeze_trainable_layers > len(layers):
            raise MethodError(f"method.freeze_trainable_layers={method.freeze_trainable_layers} but the model has "
                              f"{len(layers)} layers", hint=f"use at most {len(layers)}, or method.name=full")
        last = set(layers[-method.freeze_trainable_layers:])
        chosen = [n for n in names if (m := re.search(r"\.layers\.(\d+)\.", n)) and int(m.group(1)) in last]
    params = dict(model.named_parameters())
    for name in chosen:
        params[name].requires_grad_(True)


def count_parameters(model: "torch.nn.Module") -> ParameterCount:
    """Trainable and total parameters (a 4-bit weight counts its real element count)."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":  # packed two values per byte
            count *= 2
        total += count
        if param.requires_grad:
            trainable += count
    return ParameterCount(trainable, total)

"""The `model` and `method` sections: which weights, and how they are adapted."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatune.config.base import Section


class ModelConfig(Section):
    """Which model (and so which tokenizer and chat template). A plain string stands for `name_or_path`."""

    name_or_path: str = Field(
        "default",
        description="`default` (the embedded SmolLM2-135M-Instruct), `gemma-3-270m` (the embedded google/gemma-3-270m, "
        "a pretrained Chinese-capable base model under the Gemma Terms of Use, shipped in its package; trained with "
        "Gemma's turn template), a local Hugging Face folder, a .gguf file, "
        "or a hub id (only where the machine reaches the hub). An earlier run's train.output_dir works too "
        "(multi-stage training): a full/freeze output is a model folder; a lora/prefix output is loaded on the "
        "base recorded in its adapter_config.json and merged into it.",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `name_or_path`, if the folder holds one.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust it.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; `auto` picks bf16 where the hardware supports it."
    )


class MethodConfig(Section):
    """How the model is adapted."""

    name: Literal["lora", "qlora", "full", "freeze", "prefix"] = Field(
        "lora", description="Fine-tuning method. `lora`: low-rank adapters on a frozen base in the compute dtype. "
        "`qlora`: the same adapters on a 4-bit NF4 base (bitsandbytes, on a CUDA GPU or, with bitsandbytes>=0.50, "
        "the CPU; the adapter merges into the unquantized base). `full`: every weight. `freeze`: the last decoder "
        "layers (or named modules). `prefix`: prefix tuning (virtual tokens).",
    )
    lora_rank: int = Field(16, ge=1, description="LoRA rank r (8-64 is the usual range; 16 for the default model, "
                           "benchmarks/sweep_defaults.py).")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling alpha (the adapter's update is scaled by "
                              "alpha / r; alpha = 2 x rank is the common choice).")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA path (0 is fastest; 0.05-0.1 can help tiny data sets)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Modules that get LoRA adapters, or `all-linear`.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    freeze_trainable_layers: int = Field(2, ge=1, description="`freeze`: train only the last N decoder layers.")
    freeze_trainable_modules: list[str] = Field(
        default_factory=list, description="`freeze`: train these named modules instead of the last layers."
    )
    prefix_virtual_tokens: int = Field(20, ge=1, description="`prefix`: number of virtual prefix tokens.")


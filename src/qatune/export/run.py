"""The export stage: merge an adapter into its base and write what runtimes load.

Everything is written into a staging folder beside `export.output_dir` and moved into place only
when complete, so a failure leaves nothing half-done. The base is always loaded unquantized for
the merge: a QLoRA adapter is merged into the full-precision base (merging into 4-bit weights
would round the adapter away), and a quantized copy is made afterwards from the merged weights.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.config import QatuneConfig
from qatune.errors import QatuneError

if TYPE_CHECKING:
    from rich.console import Console

REPORT_FILE = "export_report.json"
MODELFILE = "Modelfile"
QUANTIZED_DIRS = {"int8": "int8", "bnb-8bit": "bnb-8bit", "bnb-4bit": "bnb-4bit"}


class ExportError(QatuneError):
    """An export that cannot be done as asked."""


@dataclass
class ExportResult:
    output_dir: Path
    report: dict[str, Any]


def check_request(config: QatuneConfig, device: str) -> Path:
    """Everything that can be refused before a weight is read; returns the output folder."""
    cfg = config.export
    out = Path(cfg.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ExportError(f"the output folder {out} is not empty", hint="choose another --out, or pass --force")
    if cfg.quantize in ("bnb-8bit", "bnb-4bit"):
        if device != "cuda":
            raise ExportError(f"--quantize {cfg.quantize} needs a CUDA GPU (bitsandbytes); this machine has none",
                              hint="use --quantize int8 on CPU, or run the export on a GPU machine")
        _require("bitsandbytes", f"--quantize {cfg.quantize}")
    if cfg.quantize == "int8":
        _require("torchao", "--quantize int8")
    if cfg.adapter:
        from qatune.models import ADAPTER_FILE

        adapter_config = Path(cfg.adapter) / ADAPTER_FILE
        if not adapter_config.is_file():
            raise ExportError(f"{cfg.adapter} is not an adapter folder (no {ADAPTER_FILE})",
                              hint="give the output folder of a lora or qlora training run; a full or freeze run "
                                   "is a whole model: pass it as --model")
        peft_type = json.loads(adapter_config.read_text(encoding="utf-8")).get("peft_type")
        if peft_type not in ("LORA",):
            raise ExportError(f"a {peft_type} adapter cannot be merged into the weights (only LoRA can)",
                              hint="serve it as base + adapter, or train with method.name=lora")
    return out


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{what} needs the {module} package, which is not installed",
                          hint="pip install 'qatune[int8]'" if module == "torchao" else f"pip install {module}")


def export(config: QatuneConfig, console: "Console | None" = None) -> ExportResult:
    """Merge `export.adapter` (if any) into `model`, write the Hugging Face folder, GGUF and quantized copies."""
    import torch
    import transformers
    from rich.console import Console

    console = console or Console()
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = check_request(config, device)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        report = _export_into(config, staging, console)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["wall_time_s"] = time.perf_counter() - started
    report["files"] = _files(out)
    (out / REPORT_FILE).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return ExportResult(out, report)


def _export_into(config: QatuneConfig, folder: Path, console: "Console") -> dict[str, Any]:
    import torch

    from qatune import __version__
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import save_generation_config
    from qatune.models import attach_adapter, load_model, load_tokenizer, locate_model

    cfg = config.export
    adapter = cfg.adapter
    tokenizer = load_tokenizer(config.model, adapter)  # an adapter's own, with the template it was trained on
    template = resolve_template(tokenizer, config.data.template)
    tokenizer.chat_template = template.source
    # Merge in fp32 on the CPU: exact, and independent of how the adapter was trained (qlora included).
    model = load_model(config.model, dtype=torch.float32)
    save_dtype = _save_dtype(cfg.dtype, model)
    questions = [[{"role": "user", "content": q}] for q in cfg.check_questions]
    checks: dict[str, Any] = {}
    if adapter:
        model = attach_adapter(model, adapter, config.model.name_or_path)
        reference = _answers(model, tokenizer, template, questions, cfg.check_max_new_tokens)
        model = model.merge_and_unload()
        console.print(f"Merged {adapter} into {config.model.name_or_path}")
    else:
        reference = _answers(model, tokenizer, template, questions, cfg.check_max_new_tokens)
    merged_answers = _answers(model, tokenizer, template, questions, cfg.check_max_new_tokens)
    checks["merged"] = _compare(cfg.check_questions, reference, merged_answers)

    model.to(save_dtype).save_pretrained(folder, max_shard_size=cfg.max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_generation_config(model, tokenizer, template.end_of_turn_id, folder)
    console.print(f"Wrote the merged model ({str(save_dtype).removeprefix('torch.')})")

    if cfg.gguf:
        from qatune.export.gguf import modelfile, source_pre_tokenizer, write_gguf

        loc = locate_model(config.model)
        pre = source_pre_tokenizer(Path(loc.path) / loc.gguf_file) if loc.gguf_file else None
        name = f"model-{cfg.gguf}.gguf"
        write_gguf(model.float(), tokenizer, folder, folder / name, cfg.gguf, Path(cfg.output_dir).name,
                   pre or "default")
        (folder / MODELFILE).write_text(modelfile(name, template.end_of_turn), encoding="utf-8")
        checks["gguf"] = _compare(cfg.check_questions, merged_answers, _gguf_answers(folder, name, tokenizer, template,
                                                                                   questions, cfg))
        checks["gguf"]["pre_tokenizer"] = pre or "default"
        console.print(f"Wrote {name} and an Ollama {MODELFILE}")
    if cfg.quantize:
        checks[cfg.quantize] = _quantize(folder, cfg.quantize, tokenizer, template, questions, cfg, merged_answers)
        console.print(f"Wrote the {cfg.quantize} copy to {QUANTIZED_DIRS[cfg.quantize]}/")

    return {"qatune_version": __version__, "model": config.model.name_or_path, "adapter": adapter,
            "dtype": str(save_dtype).removeprefix("torch."), "gguf": cfg.gguf, "quantize": cfg.quantize,
            "template": template.name, "end_of_turn": template.end_of_turn, "checks": checks,
            "smoke_answer": {"question": cfg.check_questions[0], "answer": merged_answers[0]} if questions else None}


def _save_dtype(requested: str, model: Any) -> Any:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    own = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return own if isinstance(own, torch.dtype) else getattr(torch, str(own or "float32"))


def _answers(model: Any, tokenizer: Any, template: Any, questions: list, max_new_tokens: int) -> list[str]:
    from qatune.infer.generation import Decoding, generate

    return [a.text for a in generate(model, tokenizer, template.source, questions,
                                     Decoding(max_new_tokens=max_new_tokens), template.end_of_turn_id)]


def _compare(questions: list[str], expected: list[str], got: list[str]) -> dict[str, Any]:
    same = [e == g for e, g in zip(expected, got)]
    return {"identical": sum(same), "questions": len(same),
            "answers": [{"question": q, "expected": e, "got": g} for q, e, g in zip(questions, expected, got)]}


def _gguf_answers(folder: Path, name: str, tokenizer: Any, template: Any, questions: list, cfg: Any) -> list[str]:
    """Answers of the GGUF file as transformers loads it (dequantized): the round-trip check."""
    import torch
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF loader draws its own progress bar
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    return _answers(model, tokenizer, template, questions, cfg.check_max_new_tokens)


def _quantize(folder: Path, kind: str, tokenizer: Any, template: Any, questions: list, cfg: Any,
              merged_answers: list[str]) -> dict[str, Any]:
    """A quantized copy of the merged folder in a subfolder that `from_pretrained` loads as it is."""
    import torch
    from transformers import AutoModelForCausalLM

    target = folder / QUANTIZED_DIRS[kind]
    if kind == "int8":
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-kernel probes are noise on a CPU
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        from transformers import TorchAoConfig

        quantization = TorchAoConfig(Int8DynamicActivationInt8WeightConfig())
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, quantization_config=quantization)
        model.save_pretrained(target, safe_serialization=False)
    else:
        from transformers import BitsAndBytesConfig

        quantization = (BitsAndBytesConfig(load_in_8bit=True) if kind == "bnb-8bit" else
                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16))
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quantization, device_map="auto")
        model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    model.generation_config.save_pretrained(str(target))
    result = _compare(cfg.check_questions, merged_answers,
                      _answers(model, tokenizer, template, questions, cfg.check_max_new_tokens))
    result["size_mib"] = _size(target) / 2**20
    result["merged_size_mib"] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    return result


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _files(folder: Path) -> dict[str, float]:
    """Each file (and quantized subfolder) with its size in MiB."""
    return {p.name: round(_size(p) / 2**20 if p.is_dir() else p.stat().st_size / 2**20, 3)
            for p in sorted(folder.iterdir())}


def print_summary(report: dict[str, Any], console: "Console") -> None:
    from rich.table import Table

    table = Table(title="Exported files", title_justify="left")
    table.add_column("file")
    table.add_column("MiB", justify="right")
    for name, size in report["files"].items():
        table.add_row(name, f"{size:,.1f}")
    console.print(table)
    for kind, check in report["checks"].items():
        line = f"{kind}: {check['identical']}/{check['questions']} greedy answers identical to " + (
            "base + adapter" if kind == "merged" else "the merged model")
        if "size_mib" in check:
            line += f"; {check['size_mib']:.0f} MiB against {check['merged_size_mib']:.0f} MiB merged"
        console.print(line, markup=False, highlight=False)

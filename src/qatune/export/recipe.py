"""The export recipe: merge an adapter into its base and write what runtimes load.

- `plan(config, runtime)`: every refusal before a weight is read (the output folder, what
  --quantize needs, an adapter that is not LoRA, a model that is nowhere) and every decision: the
  staging folder, whether the folder there now is deleted, the saved dtype. Reads only.
- `setup(plan)`: the tokenizer (the adapter's own, with its training template) and the base in
  fp32 on the CPU with the adapter on it, not yet merged.
- `run(plan, components)`: merges, writes everything into the staging folder, checks each written
  form against the model it came from, then moves the staging folder into place (deleting the old
  output where the plan says so) and writes the report.

No export holds a pickle: weights are safetensors (the int8 copy too: torchao's tensors save to
safetensors) or GGUF, and a staging folder with a .bin/.pt file is refused. The output folder is
never the model, the adapter or its base, nor a folder holding one (--force would delete it).

Everything is written into a staging folder beside `export.output_dir` and moved into place only
when complete, so a failure leaves nothing half-done. The base is always loaded unquantized for
the merge: a QLoRA adapter is merged into the full-precision base (merging into 4-bit weights
would round the adapter away), and a quantized copy is made afterwards from the merged weights.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.config import QatuneConfig
from qatune.errors import GGUFExportError, QatuneError
from qatune.export.checks import answer_texts, answers_of, compare, read_back
from qatune.export.plan import ExportPlan
from qatune.export.report import ExportReport, markdown
from qatune.files import model_folders, overlapping, write_text
from qatune.models import ADAPTER_FILE
from qatune.reports import write_report
from qatune.runtime import Runtime

if TYPE_CHECKING:
    import torch

    from qatune.data.templates import ChatTemplate
    from qatune.eval.sets import EvalSet

REPORT_FILE = "export_report.json"
REPORT_MD = "export_report.md"
QUANTIZED_DIRS = {"int8": "int8", "bnb-8bit": "bnb-8bit", "bnb-4bit": "bnb-4bit"}


class ExportError(QatuneError):
    """An export that cannot be done as asked."""


@dataclass(frozen=True)
class ExportComponents:
    model: Any  # fp32 on the CPU; with the adapter on it (not merged) when the plan has one
    tokenizer: Any
    template: "ChatTemplate"
    save_dtype: "torch.dtype"
    started: float  # perf_counter when setup began: the report's wall time counts the loading too


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    report: ExportReport


def plan(config: QatuneConfig, runtime: Runtime) -> ExportPlan:
    """Everything that can be refused before a weight is read, and where the export will go."""
    from qatune.models import locate_model, read_adapter

    cfg = config.export
    out = Path(cfg.output_dir)
    # What the export reads must survive it: --force deletes the whole folder there now.
    clash = overlapping(out, model_folders(config.model, (cfg.adapter,)), or_inside=True)
    if clash is not None:
        raise ExportError(f"export.output_dir {out} is or holds {clash}, which this export reads (the model, the "
                          "adapter or its base): writing the export there would delete it",
                          hint="choose another --out (a new folder)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise ExportError(f"the output folder {out} is not empty", hint="choose another --out, or pass --force")
    if cfg.quantize in ("bnb-8bit", "bnb-4bit"):  # bitsandbytes runs on CUDA and (>=0.50) on the CPU
        from qatune.train.methods import bitsandbytes_problem

        problem = bitsandbytes_problem(runtime.device, f"--quantize {cfg.quantize}")
        if problem:
            raise ExportError(problem[0], hint=f"{problem[1]}; or use --quantize int8")
    if cfg.quantize == "int8":
        _require("torchao", "--quantize int8")
    heldout = _gguf_refusals(config) if cfg.gguf or cfg.gguf_adapter else ()
    adapter = None
    if cfg.adapter:
        adapter = read_adapter(cfg.adapter)
        if adapter is None:
            raise ExportError(f"{cfg.adapter} is not an adapter folder (no {ADAPTER_FILE})",
                              hint="give the output folder of a lora or qlora training run; a full or freeze run "
                                   "is a whole model: pass it as --model")
        if not adapter.is_lora:
            raise ExportError(f"a {adapter.kind} adapter cannot be merged into the weights (only LoRA can)",
                              hint="serve it as base + adapter, or train with method.name=lora")
    if cfg.gguf_adapter:
        import json

        from qatune.export.gguf import lora_gguf_problem

        if adapter is None:
            raise ExportError("--gguf-adapter writes the adapter as a GGUF LoRA adapter, and no adapter was given",
                              hint="pass --adapter A (a lora/qlora training output)")
        problem = lora_gguf_problem(json.loads((adapter.path / ADAPTER_FILE).read_text(encoding="utf-8")))
        if problem:
            raise ExportError(f"{adapter.path} cannot be written as a GGUF LoRA adapter: {problem}",
                              hint="export it merged instead: --gguf f16 (or q8_0, q4_k_m...)")
    return ExportPlan(config, runtime, out, staging=out.parent / f".{out.name}.partial-{os.getpid()}",
                      deletes_existing=out.exists(), adapter=adapter, model=locate_model(config.model),
                      save_dtype=None if cfg.dtype == "auto" else _torch_dtype(cfg.dtype), heldout=heldout)


def _gguf_refusals(config: QatuneConfig) -> "tuple[EvalSet, ...]":
    """A k-quant without llama.cpp is refused; the perplexity set is read (its errors name file and line)."""
    from qatune.eval.sets import load_eval_set
    from qatune.export.gguf import K_QUANTS
    from qatune.export.llamacpp import require_llama_cpp

    cfg = config.export
    if cfg.gguf in K_QUANTS:
        try:
            require_llama_cpp(f"--gguf {cfg.gguf}")
        except GGUFExportError as exc:
            raise ExportError(exc.message, hint=exc.hint) from None
    return tuple(load_eval_set(source, "domain", cfg.perplexity_records, config.data.encoding)
                 for source in cfg.perplexity_data)


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ExportError(f"{what} needs the {module} package, which is not installed",
                          hint="pip install 'qatune[int8]'" if module == "torchao" else f"pip install {module}")


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, name)


def setup(plan: ExportPlan) -> ExportComponents:
    """The tokenizer with the training template, and the fp32 base with the adapter on it."""
    import torch

    from qatune.compat.transformers import progress_bars_off
    from qatune.data.templates import resolve_template
    from qatune.models import attach_adapter, load_model, load_tokenizer

    started = time.perf_counter()
    config = plan.config
    adapter = str(plan.adapter.path) if plan.adapter else None
    tokenizer = load_tokenizer(config.model, adapter)  # an adapter's own, with the template it was trained on
    template = resolve_template(tokenizer, config.data.template)
    tokenizer.chat_template = template.source
    # Merge in fp32 on the CPU: exact, and independent of how the adapter was trained (qlora included).
    with progress_bars_off():
        model = load_model(config.model, dtype=torch.float32)
    save_dtype = plan.save_dtype if plan.save_dtype is not None else _own_dtype(model)
    if adapter:
        model = attach_adapter(model, adapter, config.model.name_or_path)
    return ExportComponents(model, tokenizer, template, save_dtype, started)


def _own_dtype(model: Any) -> "torch.dtype":
    """export.dtype auto: the dtype the loaded model's config names (float32 where it names none)."""
    import torch

    own = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return own if isinstance(own, torch.dtype) else getattr(torch, str(own or "float32"))


def run(plan: ExportPlan, parts: ExportComponents) -> ExportResult:
    """Write the export into the staging folder, then put it in place of `output_dir`."""
    from qatune.compat.transformers import progress_bars_off

    out, staging = plan.output_dir, plan.staging
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier process that had this pid
    staging.mkdir(parents=True)
    try:
        with progress_bars_off():
            try:
                report = _write_export(plan, parts, staging)
            except GGUFExportError as exc:  # its fix names the folder written: the final one, not the staging one
                raise ExportError(exc.message, hint=(exc.hint or "").replace(str(staging), str(out)) or None) from None
        _refuse_pickles(staging)
        if plan.deletes_existing:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.wall_time_s = time.perf_counter() - parts.started
    report.files = _files(out)
    write_report(report, out / REPORT_FILE)
    write_text(out / REPORT_MD, markdown(report))
    return ExportResult(out, report)


# Suffixes of files torch.save / pickle write: loading one runs code, so an export holds none.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _refuse_pickles(folder: Path) -> None:
    """An export is shared: refuse one in which a library wrote a pickle (safetensors and GGUF only)."""
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise ExportError(f"the export would contain pickled files ({', '.join(found)}), which run code when loaded",
                          hint="report this as a bug; the safetensors and GGUF files are the ones to use")


def _write_export(plan: ExportPlan, parts: ExportComponents, folder: Path) -> ExportReport:
    """Merge, write every form into `folder`, and check each against the model it was made from."""
    from qatune import __version__
    from qatune.infer.generation import save_generation_config

    cfg, console = plan.config.export, plan.runtime.console
    model, tokenizer, template = parts.model, parts.tokenizer, parts.template
    questions = [[{"role": "user", "content": q}] for q in cfg.check_questions]
    checks: dict[str, Any] = {}
    merged = answers_of(model, tokenizer, template, questions, cfg.check_max_new_tokens)
    merged_answers = reference = [a.text for a in merged]
    tokenizer.save_pretrained(folder)  # first: the GGUF writer reads its merges from the folder
    if cfg.gguf_adapter:  # the base goes into GGUF before the merge changes its weights
        from qatune.export.gguf_step import write_base

        write_base(plan, model, tokenizer, folder)
    if plan.adapter:
        model = model.merge_and_unload()
        console.print(f"Merged {cfg.adapter} into {plan.config.model.name_or_path}")
        merged = answers_of(model, tokenizer, template, questions, cfg.check_max_new_tokens)
        merged_answers = [a.text for a in merged]
        checks["merged"] = compare(cfg.check_questions, reference, merged_answers)

    model.to(parts.save_dtype).save_pretrained(folder, max_shard_size=cfg.max_shard_size, safe_serialization=True)
    save_generation_config(model, tokenizer, template.end_of_turn_id, folder)
    console.print(f"Wrote the merged model ({str(parts.save_dtype).removeprefix('torch.')})")
    if not plan.adapter:  # nothing was merged: check the folder just written against the model as loaded
        checks["saved"] = compare(cfg.check_questions, reference,
                                  answer_texts(read_back(folder), tokenizer, template, questions,
                                           cfg.check_max_new_tokens))

    perplexity = None
    if cfg.gguf or cfg.gguf_adapter:
        from qatune.data.templates import render
        from qatune.export.gguf_step import CheckPrompts, checks_in_llama_cpp, heldout_rows, write_and_check
        from qatune.infer.generation import prompt_ids, stop_token_ids

        check = CheckPrompts(list(cfg.check_questions),
                             [render(tokenizer, template.source, q, add_generation_prompt=True) for q in questions],
                             [prompt_ids(tokenizer, template.source, q) for q in questions], merged,
                             set(stop_token_ids(tokenizer, template.end_of_turn_id)), cfg.check_max_new_tokens)
        heldout_name, heldout = (heldout_rows(plan, list(plan.heldout), tokenizer, template)
                                 if checks_in_llama_cpp(cfg.gguf) else (None, None))
        gguf_checks, perplexity = write_and_check(plan, model.float(), tokenizer, template, folder, check, heldout,
                                                  heldout_name)
        checks.update(gguf_checks)
        console.print("Wrote " + ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf"
                                                   or p.name.startswith("Modelfile"))))
    if cfg.quantize:
        checks[cfg.quantize] = _quantize(folder, cfg.quantize, tokenizer, template, questions, cfg, merged_answers,
                                         plan.runtime.compute_dtype())
        console.print(f"Wrote the {cfg.quantize} copy to {QUANTIZED_DIRS[cfg.quantize]}/")

    return ExportReport(
        qatune_version=__version__, model=plan.config.model.name_or_path, adapter=cfg.adapter,
        dtype=str(parts.save_dtype).removeprefix("torch."), gguf=cfg.gguf, gguf_adapter=cfg.gguf_adapter,
        quantize=cfg.quantize, template=template.name, end_of_turn=template.end_of_turn, checks=checks,
        gguf_perplexity=perplexity,
        smoke_answer={"question": cfg.check_questions[0], "answer": merged_answers[0]} if questions else None)


def _quantize(folder: Path, kind: str, tokenizer: Any, template: Any, questions: list, cfg: Any,
              merged_answers: list[str], compute_dtype: Any) -> dict[str, Any]:
    """A quantized copy of the merged folder in a subfolder that `from_pretrained` loads as it is
    (bnb-4bit computes in `compute_dtype`: bf16 only where it is native)."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    target = folder / QUANTIZED_DIRS[kind]
    if kind == "int8":
        from transformers import TorchAoConfig

        from qatune.compat.process import logger_levels

        with logger_levels({"torchao": logging.ERROR}):  # its CUDA-kernel probes are noise on a CPU
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            quantization = TorchAoConfig(Int8DynamicActivationInt8WeightConfig())
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                         quantization_config=quantization)
            # torchao's Int8Tensor saves to safetensors (torchao 0.18, transformers 5.24); the check below
            # answers with the copy as read back from them.
            model.save_pretrained(target, safe_serialization=True)
            model = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    else:
        from transformers import BitsAndBytesConfig

        quantization = (BitsAndBytesConfig(load_in_8bit=True) if kind == "bnb-8bit" else
                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=compute_dtype))
        model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quantization, device_map="auto")
        model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    model.generation_config.save_pretrained(str(target))
    result = compare(cfg.check_questions, merged_answers,
                      answer_texts(model, tokenizer, template, questions, cfg.check_max_new_tokens))
    result["size_mib"] = _size(target) / 2**20
    result["merged_size_mib"] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
    return result


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _files(folder: Path) -> dict[str, float]:
    """Each file (and quantized subfolder) with its size in MiB."""
    return {p.name: round(_size(p) / 2**20 if p.is_dir() else p.stat().st_size / 2**20, 3)
            for p in sorted(folder.iterdir())}

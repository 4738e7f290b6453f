"""The GGUF step of an export: the files (`--gguf`, `--gguf-adapter`) and their checks.

With llama.cpp installed (`qatune[llamacpp]`) every check runs in llama.cpp itself: the f16 GGUF's
greedy answers to the check questions against the merged model's, token for token; the quantized
file's answers against the f16 one's; each file's perplexity on held-out answers beside the f16
file's (what q4_k_m costs); and the LoRA adapter GGUF on its base GGUF against the merged model.
Without it, f16/bf16/q8_0 files are read back with transformers' GGUF reader, as the only check
possible, and the report says so.

An f16 file is the reference: written first from the merged fp32 weights, the source of the
k-quants, and deleted at the end unless f16 was the type asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.export.checks import NEAR_TIE
from qatune.export.gguf import K_QUANTS, WRITER_TYPES, modelfile, source_pre_tokenizer, write_gguf, write_lora_gguf
from qatune.export.llamacpp import LlamaCppModel, context_for, llama_cpp_installed, perplexity, quantize_gguf
from qatune.files import write_text

if TYPE_CHECKING:
    from qatune.data.templates import ChatTemplate
    from qatune.eval.sets import EvalSet
    from qatune.export.plan import ExportPlan
    from qatune.infer.generation import Answer

MODELFILE = "Modelfile"
ADAPTER_MODELFILE = "Modelfile.adapter"
ADAPTER_GGUF = "adapter.gguf"
REFERENCE = "f16"


@dataclass(frozen=True)
class CheckPrompts:
    """The check questions as qatune tokenizes them, and the merged model's greedy answers to them."""

    questions: list[str]
    texts: list[str]  # each prompt rendered with the template: what llama.cpp's own tokenizer is given
    prompts: list[list[int]]
    expected: list["Answer"]
    stops: set[int]
    max_new_tokens: int


def model_file(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def base_file(qtype: str) -> str:
    return f"base-{qtype}.gguf"


def checks_in_llama_cpp(qtype: str | None) -> bool:
    """llama.cpp checks the files where it is installed (a k-quant needs it anyway)."""
    return llama_cpp_installed() or qtype in K_QUANTS


def write_base(plan: "ExportPlan", model: Any, tokenizer: Any, folder: Path) -> None:
    """The base model as GGUF for the adapter GGUF to go on, from `model` before the merge (a peft
    model: its base weights): base-<type>.gguf, and base-f16.gguf as the checks' reference."""
    qtype = plan.config.export.gguf or REFERENCE
    kinds = {qtype} if qtype in WRITER_TYPES else set()
    if checks_in_llama_cpp(qtype):
        kinds.add(REFERENCE)
    for kind in sorted(kinds):
        write_gguf(model, tokenizer, folder, folder / base_file(kind), kind, f"{plan.output_dir.name}-base",
                   _pre_tokenizer(plan))


def _pre_tokenizer(plan: "ExportPlan") -> str:
    """`tokenizer.ggml.pre` of the GGUF the base came from (the default model's), else llama.cpp's default."""
    loc = plan.model
    return (source_pre_tokenizer(Path(loc.path) / loc.gguf_file) if loc.gguf_file else None) or "default"


def write_and_check(plan: "ExportPlan", merged: Any, tokenizer: Any, template: "ChatTemplate", folder: Path,
                    check: CheckPrompts, heldout: "list[tuple[list[int], list[int]]] | None",
                    heldout_name: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write the GGUF files into `folder` and check them; returns (checks, perplexity section)."""
    cfg = plan.config.export
    decoding = plan.config.serve.decoding
    checks: dict[str, Any] = {}
    in_llama_cpp = checks_in_llama_cpp(cfg.gguf)
    ppl_files: list[str] = []
    name = plan.output_dir.name
    if cfg.gguf:
        target = model_file(cfg.gguf)
        if in_llama_cpp or cfg.gguf == REFERENCE:
            write_gguf(merged, tokenizer, folder, folder / model_file(REFERENCE), REFERENCE, name, _pre_tokenizer(plan))
        if cfg.gguf in K_QUANTS:
            quantize_gguf(folder / model_file(REFERENCE), folder / target, cfg.gguf)
        elif cfg.gguf != REFERENCE:
            write_gguf(merged, tokenizer, folder, folder / target, cfg.gguf, name, _pre_tokenizer(plan))
        write_text(folder / MODELFILE, modelfile(target, template.end_of_turn, decoding))
        if in_llama_cpp:
            checks["gguf"] = _greedy_check(folder / model_file(REFERENCE), None, check, check.expected, "merged model")
            ppl_files.append(model_file(REFERENCE))
            if cfg.gguf != REFERENCE:
                reference = [_as_answer(a) for a in checks["gguf"]["answers"]]
                checks[f"gguf {cfg.gguf}"] = _greedy_check(folder / target, None, check, reference, "f16 GGUF")
                ppl_files.append(target)
        else:
            checks["gguf"] = _transformers_check(folder, target, tokenizer, template, check)
        checks["gguf"]["pre_tokenizer"] = _pre_tokenizer(plan)
    if cfg.gguf_adapter:
        qtype = cfg.gguf or REFERENCE
        write_lora_gguf(plan.adapter.path, merged.config, folder / ADAPTER_GGUF, f"{name}-adapter")
        if qtype in K_QUANTS:
            quantize_gguf(folder / base_file(REFERENCE), folder / base_file(qtype), qtype)
        write_text(folder / ADAPTER_MODELFILE, modelfile(base_file(qtype), template.end_of_turn, decoding,
                                                         adapter=ADAPTER_GGUF, file_name=ADAPTER_MODELFILE))
        if in_llama_cpp:
            checks["gguf adapter"] = _greedy_check(folder / base_file(REFERENCE), folder / ADAPTER_GGUF, check,
                                                   check.expected, "merged model")
        else:
            checks["gguf adapter"] = {"checked": False, "why": "llama.cpp is not installed (pip install "
                                      "'qatune[llamacpp]'); transformers cannot load a GGUF LoRA adapter"}
    section = _perplexities(folder, ppl_files, heldout, heldout_name) if ppl_files else None
    if cfg.gguf not in (None, REFERENCE):  # the f16 references nobody asked for
        (folder / model_file(REFERENCE)).unlink(missing_ok=True)
        (folder / base_file(REFERENCE)).unlink(missing_ok=True)
    return checks, section


def _as_answer(row: dict[str, Any]) -> Any:
    """A checked answer of llama.cpp as the reference of the next check."""
    from qatune.infer.generation import Answer

    return Answer(row["got"], len(row["got_tokens"]), 0.0, tuple(row["got_tokens"]))


def _greedy_check(path: Path, lora: Path | None, check: CheckPrompts, expected: list["Answer"],
                  against: str) -> dict[str, Any]:
    """Greedy answers of `path` (with the adapter `lora`) in llama.cpp, token for token against `expected`."""
    rows = []
    with LlamaCppModel(path, context_for(check.prompts, check.max_new_tokens), lora) as model:
        for question, text, prompt, want in zip(check.questions, check.texts, check.prompts, expected):
            got = model.greedy(prompt, check.max_new_tokens, check.stops)
            wanted = list(want.token_ids)
            differs = next((i for i, (a, b) in enumerate(zip(got, wanted)) if a != b),
                           None if len(got) == len(wanted) else min(len(got), len(wanted)))
            gap = (model.logit_gap([*prompt, *got[:differs]], wanted[differs])
                   if differs is not None and differs < len(wanted) else None)
            rows.append({"question": question, "expected": want.text, "got": _decode(model, got),
                         "identical": differs is None, "first_difference": differs,
                         "logit_gap": None if gap is None else round(gap, 4), "got_tokens": got,
                         "llama_cpp_tokenizer_agrees": model.tokenize(text) == prompt})
    return {"engine": "llama.cpp", "file": path.name, **({"adapter": lora.name} if lora else {}),
            "against": against, "identical": sum(r["identical"] for r in rows),
            "near_ties": sum(r["logit_gap"] is not None and r["logit_gap"] < NEAR_TIE for r in rows),
            "questions": len(rows), "answers": rows}


def _decode(model: LlamaCppModel, ids: list[int]) -> str:
    return model.llm.detokenize(ids).decode("utf-8", errors="replace").strip().rstrip("\ufffd")


def _transformers_check(folder: Path, name: str, tokenizer: Any, template: "ChatTemplate",
                        check: CheckPrompts) -> dict[str, Any]:
    """Without llama.cpp: the file read back by transformers' GGUF reader answers like the merged model."""
    from qatune.export.checks import answers_of, compare, read_back

    got = answers_of(read_back(folder, gguf_file=name), tokenizer, template,
                     [[{"role": "user", "content": q}] for q in check.questions], check.max_new_tokens)
    result = compare(check.questions, [a.text for a in check.expected], [a.text for a in got])
    return {"engine": "transformers (llama.cpp not installed: pip install 'qatune[llamacpp]')", "file": name,
            "against": "merged model", **result}


def _perplexities(folder: Path, files: list[str], rows: "list[tuple[list[int], list[int]]] | None",
                  name: str | None) -> dict[str, Any]:
    """Each file's perplexity on the held-out answers, beside the f16 file's."""
    if not rows:
        return {"measured": False, "why": "no held-out set: set export.perplexity_data, or prepare data with a "
                "validation split in data.output_dir"}
    n_ctx = context_for([ids for ids, _ in rows])
    values = {}
    for file in files:
        with LlamaCppModel(folder / file, n_ctx) as model:
            values[file] = perplexity(model, rows)
    reference = values[files[0]]
    return {"measured": True, "set": name, "records": len(rows),
            "tokens": sum(sum(1 for t in labels[1:] if t != -100) for _, labels in rows),
            "files": {f: {"perplexity": round(v, 4), "vs_f16_percent": round(100 * (v / reference - 1), 2)}
                      for f, v in values.items()}}


def heldout_rows(plan: "ExportPlan", sets: "list[EvalSet]", tokenizer: Any,
                 template: "ChatTemplate") -> tuple[str | None, list[tuple[list[int], list[int]]] | None]:
    """Token ids and labels (answer tokens only) of the held-out records: export.perplexity_data's sets
    tokenized with the training template, else the validation split prepared in data.output_dir."""
    from qatune.data.templates import tokenize
    from qatune.eval.sets import drop_control_tokens

    config, limit = plan.config, plan.config.export.perplexity_records
    if sets:
        for eval_set in sets:
            drop_control_tokens(eval_set, tokenizer)
        convs = [item.conversation for s in sets for item in s.qa][:limit]
        rows = [(list(sample.input_ids), list(sample.labels))
                for _, samples in tokenize(convs, tokenizer, template, config.data.max_length, False)
                for sample in samples[:1]]
        return ", ".join(s.name for s in sets), rows[:limit]
    from qatune.data.prepare import DATASET_DIR, load_prepared

    out = Path(config.data.output_dir)
    if not (out / DATASET_DIR).is_dir():
        return None, None
    validation = load_prepared(out).validation
    if validation is None or not len(validation):
        return None, None
    picked = validation.select(range(min(limit, len(validation))))
    return f"{out} (validation split)", [(list(r["input_ids"]), list(r["labels"])) for r in picked]

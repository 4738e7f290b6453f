"""GGUF in llama.cpp itself: k-quants, the export's llama.cpp checks and perplexity, and the LoRA adapter GGUF."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console

from qatune.compat.llama_cpp import plain_cpu_buffers
from qatune.config import ModelConfig, load_config
from qatune.runtime import Runtime

from ..conftest import PAIRS, write_jsonl

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp checks need pip install 'qatune[llamacpp]'")

QUESTION = [{"role": "user", "content": "What should I do when I have a fever?"}]


def _quiet() -> Runtime:
    return Runtime(device="cpu", console=Console(file=io.StringIO()))


def _lora(base, folder, seed=0, **settings):
    """A random, nonzero LoRA adapter on q, k, v and down (q and k need llama.cpp's row permutation)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, **settings))
    with torch.no_grad():  # a trained adapter's size: it changes the answer without drowning the base
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.3)
    model.save_pretrained(folder)
    return model


def _llama_greedy(path, prompt, new_tokens, lora=None, stops=(2,)):
    from qatune.export.llamacpp import LlamaCppModel

    with LlamaCppModel(path, 512, lora) as model:
        return model.greedy(prompt, new_tokens, set(stops))


def _llama_nll(path, ids, lora=None):
    from qatune.export.llamacpp import LlamaCppModel

    with LlamaCppModel(path, 512, lora) as model:
        return model.negative_log_likelihood(ids, ids)[0]


def _hf_greedy(model, prompt, new_tokens, stops=(2,)):
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=2, eos_token_id=list(stops))
    row = out[0, len(prompt):].tolist()
    return row[:next((i for i, t in enumerate(row) if t in stops), len(row))]


@pytest.mark.slow
@pytest.mark.parametrize("family, settings", [("llama", dict(r=4, lora_alpha=8)),
                                              ("llama", dict(r=8, lora_alpha=4, use_rslora=True)),
                                              ("qwen2", dict(r=4, lora_alpha=8))], ids=["lora", "rslora", "qwen2"])
def test_adapter_gguf_on_the_base_gguf_answers_like_the_merged_model(tiny_model_dir, tokenizer, tmp_path, family,
                                                                     settings):
    """Tiny models: the peft adapter as a llama.cpp LoRA GGUF on the f16 base = the merged model, token for token."""
    from transformers import AutoModelForCausalLM

    from qatune.export.gguf import write_gguf, write_lora_gguf

    from .test_gguf_families import _tiny

    base = (AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32) if family == "llama"
            else _tiny(family, tokenizer)).eval()
    write_gguf(base, tokenizer, tiny_model_dir, tmp_path / "base.gguf", "f16", "tiny")
    peft_model = _lora(base, tmp_path / "lora", **settings)
    write_lora_gguf(tmp_path / "lora", base.config, tmp_path / "adapter.gguf", "tiny-lora")
    merged = peft_model.merge_and_unload().eval()
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = list(prompt["input_ids"])
    with_adapter = _llama_greedy(tmp_path / "base.gguf", prompt, 16, lora=tmp_path / "adapter.gguf")
    assert with_adapter == _hf_greedy(merged, prompt, 16)
    # The adapter is applied, and adds what peft adds: the prompt's likelihood moves far more than the
    # distance between llama.cpp's and transformers' figures for the merged model.
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(merged(torch.tensor([prompt])).logits[0, :-1],
                                                 torch.tensor(prompt[1:]), reduction="sum").item()
    got, bare = (_llama_nll(tmp_path / "base.gguf", prompt, lora) for lora in (tmp_path / "adapter.gguf", None))
    assert abs(got - want) * 20 < abs(bare - want)

    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "adapter.gguf")).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == settings["lora_alpha"]


@pytest.fixture(scope="module")
def quantized_export(tmp_path_factory):
    """The default model with a random LoRA, exported as q4_k_m with the adapter GGUF, perplexity on PAIRS."""
    from qatune.export.run import export
    from qatune.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("gguf-export")
    _lora(load_model(ModelConfig(), dtype=torch.float32), root / "lora")
    load_tokenizer(ModelConfig()).save_pretrained(root / "lora")
    heldout = write_jsonl(root / "heldout.jsonl", [{"question": q, "answer": a} for q, a in PAIRS])
    config = load_config(None, [f"export.adapter={root / 'lora'}", f"export.output_dir={root / 'out'}",
                                "export.gguf=q4_k_m", "export.gguf_adapter=true", f"export.perplexity_data={heldout}",
                                "export.check_max_new_tokens=24"])
    return export(config, _quiet())


@pytest.mark.slow
def test_q4_k_m_export_checked_in_llama_cpp(quantized_export):
    from llama_cpp import Llama

    out, report = quantized_export.output_dir, quantized_export.report
    checks = report.checks
    # The f16 reference in llama.cpp answers like the merged model token for token, or parts from it only
    # at a near tie (f16 rounding); it is gone afterwards: q4_k_m was asked for.
    gguf = checks["gguf"]
    assert gguf["engine"] == "llama.cpp" and gguf["questions"] == 2 and gguf["identical"] >= 1
    assert gguf["identical"] + gguf["near_ties"] == 2
    assert all(a["llama_cpp_tokenizer_agrees"] for a in checks["gguf"]["answers"])
    assert not (out / "model-f16.gguf").exists() and not (out / "base-f16.gguf").exists()
    # The q4_k_m file is a k-quant, made by llama.cpp's quantizer, and loads and answers in llama.cpp.
    from gguf import GGUFReader, GGMLQuantizationType

    kinds = {t.tensor_type for t in GGUFReader(str(out / "model-q4_k_m.gguf")).tensors}
    assert GGMLQuantizationType.Q4_K in kinds or GGMLQuantizationType.Q6_K in kinds
    with plain_cpu_buffers():
        llm = Llama(model_path=str(out / "model-q4_k_m.gguf"), n_ctx=512, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=QUESTION, max_tokens=24, temperature=0)
    finally:
        llm.close()
    assert len(reply["choices"][0]["message"]["content"].split()) >= 3
    assert checks["gguf q4_k_m"]["questions"] == 2 and all(a["got"] for a in checks["gguf q4_k_m"]["answers"])
    # Perplexity of both on the held-out answers, in the json and the md: what q4_k_m costs.
    ppl = report.gguf_perplexity
    assert ppl["measured"] and ppl["records"] == len(PAIRS) and ppl["tokens"] > 50
    f16, q4 = ppl["files"]["model-f16.gguf"]["perplexity"], ppl["files"]["model-q4_k_m.gguf"]["perplexity"]
    assert math.isfinite(f16) and 1 < f16 < 1000 and q4 > 0.97 * f16
    assert "| model-q4_k_m.gguf |" in (out / "export_report.md").read_text(encoding="utf-8")
    assert json.loads((out / "export_report.json").read_text(encoding="utf-8"))["gguf_perplexity"] == ppl


@pytest.mark.slow
def test_adapter_gguf_export_on_the_default_model(quantized_export):
    out, checks = quantized_export.output_dir, quantized_export.report.checks
    # llama.cpp, base f16 GGUF + adapter GGUF: the merged model's greedy answers, token for token.
    adapter = checks["gguf adapter"]
    assert adapter["adapter"] == "adapter.gguf" and adapter["questions"] == 2 and adapter["identical"] >= 1
    assert adapter["identical"] + adapter["near_ties"] == 2
    # ...and the merged f16 GGUF's, where both run in llama.cpp with the same rounding.
    assert [a["got_tokens"][:8] for a in adapter["answers"]] == [a["got_tokens"][:8] for a in checks["gguf"]["answers"]]
    assert (out / "adapter.gguf").stat().st_size < 0.1 * (out / "base-q4_k_m.gguf").stat().st_size
    modelfile = (out / "Modelfile.adapter").read_text()
    assert "FROM ./base-q4_k_m.gguf\nADAPTER ./adapter.gguf\n" in modelfile and "<|im_start|>" in modelfile
    assert "FROM ./model-q4_k_m.gguf" in (out / "Modelfile").read_text()


def test_k_quant_and_adapter_refusals_write_nothing(tmp_path, monkeypatch):
    import importlib.util

    from qatune.export.run import ExportError, export

    out = tmp_path / "out"
    real = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
        with pytest.raises(ExportError, match="needs llama.cpp") as info:
            export(load_config(None, [f"export.output_dir={out}", "export.gguf=q5_k_m"]), _quiet())
        assert "qatune[llamacpp]" in str(info.value)
    with pytest.raises(ExportError, match="no adapter was given"):
        export(load_config(None, [f"export.output_dir={out}", "export.gguf_adapter=true"]), _quiet())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4,
                                                          "lora_alpha": 8, "base_model_name_or_path": "default"}))
    with pytest.raises(ExportError, match="uses DoRA"):
        export(load_config(None, [f"export.output_dir={out}", "export.gguf_adapter=true", f"export.adapter={dora}"]),
               _quiet())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora"]

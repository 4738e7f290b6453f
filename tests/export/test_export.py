"""Export: merged weights equal base + adapter, the GGUF round trip, int8, and refusals that write nothing."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from qatune.config import ModelConfig, load_config
from qatune.errors import ModelLoadError
from qatune.export.run import ExportError, export
from qatune.runtime import Runtime

QUESTIONS = ["What should I do when I have a fever?", "感冒了应该注意什么？"]


def _quiet(device: str | None = None) -> Runtime:
    """This machine's runtime (or one on `device`) with a console that prints nowhere."""
    console = Console(file=io.StringIO())
    return Runtime.detect(console) if device is None else Runtime(device=device, console=console)


def _adapter(folder, base_loader, seed=0):
    """A small random (non-zero) LoRA adapter saved like a qatune train output."""
    from peft import LoraConfig, get_peft_model

    from qatune.models import load_tokenizer

    torch.manual_seed(seed)
    model = get_peft_model(base_loader(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    model.save_pretrained(folder)
    load_tokenizer(ModelConfig()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def default_adapter(tmp_path_factory):
    from qatune.models import load_model

    return _adapter(tmp_path_factory.mktemp("adapter"), lambda: load_model(ModelConfig(), dtype=torch.float32))


def _greedy_ids(model, tokenizer, question, new_tokens=24):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=2)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def exported(default_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    config = load_config(None, [f"export.adapter={default_adapter}", f"export.output_dir={out}", "export.gguf=f16",
                                "export.quantize=int8", "export.max_shard_size=200MB"])
    return export(config, _quiet())


@pytest.mark.slow
def test_merged_folder_loads_plainly_and_equals_base_plus_adapter(exported, default_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune.models import load_model

    out = exported.output_dir
    assert (out / "model.safetensors.index.json").is_file()  # sharded over max_shard_size
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    assert 2 in json.loads((out / "generation_config.json").read_text())["eos_token_id"]  # <|im_end|>
    unmerged = PeftModel.from_pretrained(load_model(ModelConfig(), dtype=torch.float32), default_adapter).eval()
    base = load_model(ModelConfig(), dtype=torch.float32).eval()
    for question in QUESTIONS:
        expected = _greedy_ids(unmerged, tokenizer, question)
        assert _greedy_ids(merged, tokenizer, question) == expected  # token for token
    assert _greedy_ids(base, tokenizer, QUESTIONS[1]) != expected  # the adapter does change the answer
    assert exported.report.checks["merged"]["identical"] == 2


@pytest.mark.slow
def test_gguf_round_trip_and_modelfile(exported):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported.output_dir
    fields = GGUFReader(str(out / "model-f16.gguf")).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    assert gguf_tokenizer.encode("感冒了 fever <|im_end|>") == tokenizer.encode("感冒了 fever <|im_end|>")
    assert _greedy_ids(from_gguf, tokenizer, QUESTIONS[0]) == _greedy_ids(merged, tokenizer, QUESTIONS[0])
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0.7\nPARAMETER top_p 0.9" in modelfile  # serve.decoding's defaults


def test_modelfile_samples_as_serve_decoding_says():
    from qatune.config import DecodingConfig
    from qatune.export.gguf import modelfile

    text = modelfile("model-f16.gguf", "<|eot_id|>", DecodingConfig(temperature=0.3, top_p=0.8))
    assert "PARAMETER temperature 0.3\nPARAMETER top_p 0.8" in text and "<|start_header_id|>" in text


@pytest.mark.slow
def test_int8_copy_answers_and_is_smaller(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported.output_dir
    check = exported.report.checks["int8"]
    assert check["size_mib"] < 0.6 * check["merged_size_mib"]
    assert all(a["got"].strip() for a in check["answers"])
    model = AutoModelForCausalLM.from_pretrained(out / "int8").eval()
    answer = AutoTokenizer.from_pretrained(out / "int8").decode(_greedy_ids(model, AutoTokenizer.from_pretrained(out),
                                                                            QUESTIONS[0], 12))
    assert answer.strip()
    report = json.loads((out / "export_report.json").read_text(encoding="utf-8"))
    assert report["files"]["int8"] > 0 and report["smoke_answer"]["answer"]
    # No pickle anywhere in what is shared (issue 19): the int8 weights are safetensors.
    assert (out / "int8" / "model.safetensors").is_file()
    assert [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")] == []


def test_refusals_write_nothing(tiny_model_dir, tmp_path, default_adapter, monkeypatch):
    import importlib.util

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cpu = _quiet("cpu")
    base = [f"model={json.dumps(str(tiny_model_dir))}", f"export.output_dir={out}"]
    with pytest.raises(ExportError, match="is not empty"):
        export(load_config(None, base), cpu)
    real = importlib.util.find_spec  # bitsandbytes missing: the one place bnb-* cannot run
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
        with pytest.raises(ExportError, match="needs the bitsandbytes package") as info:
            export(load_config(None, base + ["export.overwrite=true", "export.quantize=bnb-4bit"]), cpu)
        assert "qatune[qlora]" in str(info.value) and "--quantize int8" in str(info.value)
    with pytest.raises(ExportError, match="not an adapter folder"):
        export(load_config(None, base + ["export.overwrite=true", f"export.adapter={tmp_path}"]), cpu)
    # An adapter trained on the default model does not fit the tiny one: found while loading, before staging.
    with pytest.raises(ModelLoadError, match="does not fit the model"):
        export(load_config(None, base + ["export.overwrite=true", f"export.adapter={default_adapter}"]), cpu)
    with pytest.raises(ModelLoadError, match="not found"):
        export(load_config(None, [f"model={tmp_path / 'no-model'}", f"export.output_dir={out}",
                                  "export.overwrite=true"]), cpu)
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_the_model_adapter_and_base_are_never_the_export_folder(tiny_model_dir, tmp_path):
    """Even with --force (which deletes the folder there): refused before anything is read or deleted."""
    import hashlib
    import shutil

    def snapshot(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    adapter = tmp_path / "runs" / "lora"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                             str(model)}))
    before = snapshot(tmp_path)
    for out, args in ((model, [f"model={model}"]), (tmp_path / "models", [f"model={model}"]),
                      (adapter, [f"export.adapter={adapter}", f"model={model}"]),
                      (model, [f"export.adapter={adapter}", "model=default"])):  # the base the adapter names
        with pytest.raises(ExportError, match="which this export reads"):
            export(load_config(None, args + [f"export.output_dir={out}", "export.overwrite=true"]), _quiet("cpu"))
    assert snapshot(tmp_path) == before


def test_a_staging_folder_with_a_pickle_is_refused(tmp_path):
    from qatune.export.recipe import _refuse_pickles

    (tmp_path / "int8").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    _refuse_pickles(tmp_path)
    (tmp_path / "int8" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"pickled files \(int8/pytorch_model.bin\)"):
        _refuse_pickles(tmp_path)


def test_prefix_adapters_cannot_be_merged(tmp_path):
    adapter = tmp_path / "prefix"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ExportError, match="PREFIX_TUNING adapter cannot be merged"):
        export(load_config(None, [f"export.adapter={adapter}", f"export.output_dir={tmp_path / 'out'}"]),
               _quiet())


def test_export_of_a_whole_model_without_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export(load_config(None, [f"model={json.dumps(str(tiny_model_dir))}",
                                       f"export.output_dir={tmp_path / 'out'}", "export.gguf=q8_0"]),
                    _quiet())
    checks = result.report.checks
    # Nothing was merged, so no "merged" check: the folder written is read back and answers like the model.
    assert result.report.adapter is None and "merged" not in checks and checks["saved"]["identical"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.hidden_size == 64
    assert (tmp_path / "out" / "model-q8_0.gguf").stat().st_size > 0


def test_the_check_without_adapter_catches_a_damaged_write(tiny_model_dir, tmp_path, monkeypatch):
    """The check compares two different things: weights damaged on their way to disk show in it."""
    from transformers import PreTrainedModel

    save = PreTrainedModel.save_pretrained

    def damaged_save(self, *args, **kwargs):
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", damaged_save)
    result = export(load_config(None, [f"model={json.dumps(str(tiny_model_dir))}",
                                       f"export.output_dir={tmp_path / 'out'}"]), _quiet())
    check = result.report.checks["saved"]
    assert check["questions"] == 2 and check["identical"] < 2
    assert any(a["expected"] != a["got"] for a in check["answers"])


def test_plan_decides_and_touches_nothing(tiny_model_dir, default_adapter, tmp_path):
    from qatune.export import recipe

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier export")
    config = load_config(None, [f"model={json.dumps(str(tiny_model_dir))}", f"export.output_dir={out}",
                                "export.overwrite=true", f"export.adapter={default_adapter}", "export.dtype=bfloat16"])
    plan = recipe.plan(config, _quiet("cpu"))
    assert plan.deletes_existing and plan.output_dir == out and plan.staging.parent == tmp_path
    assert plan.adapter is not None and plan.adapter.is_lora and plan.adapter.rank == 4
    assert plan.save_dtype == torch.bfloat16 and plan.model.path == str(tiny_model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").is_file()
    auto = recipe.plan(load_config(None, [f"model={json.dumps(str(tiny_model_dir))}",
                                          f"export.output_dir={tmp_path / 'new'}"]), _quiet("cpu"))
    assert auto.save_dtype is None and not auto.deletes_existing and auto.adapter is None


@pytest.mark.parametrize("kind", ["bnb-4bit", "bnb-8bit"])
def test_bnb_copy_on_cpu_loads_and_answers(tiny_model_dir, tmp_path, kind):
    """bitsandbytes' CPU backend (>= 0.50): the quantized copy is written, loads back quantized and answers."""
    pytest.importorskip("bitsandbytes", reason="--quantize bnb-* needs bitsandbytes (pip install 'qatune[qlora]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = export(load_config(None, [f"model={json.dumps(str(tiny_model_dir))}", f"export.output_dir={out}",
                                       f"export.quantize={kind}", "export.check_max_new_tokens=6"]), _quiet("cpu"))
    check = result.report.checks[kind]
    # The check answered every question with the copy (the tiny random model's greedy answers are empty text).
    assert check["questions"] == len(check["answers"]) == 2
    folder = out / kind
    assert (folder / "model.safetensors").is_file() and result.report.files[kind] > 0
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    layer = type(model.model.layers[0].self_attn.q_proj).__name__
    assert layer == ("Linear4bit" if kind == "bnb-4bit" else "Linear8bitLt")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(_greedy_ids(model, tokenizer, QUESTIONS[0], 6)) == 6
    # It computes what the fp32 model computes, up to the rounding of its weights.
    probe = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = model(probe).logits.float().flatten(), full(probe).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95
    assert [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")] == []

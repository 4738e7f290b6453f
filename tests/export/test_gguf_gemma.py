"""Gemma 3 as llama.cpp's gemma3: tiny random Gemma 3 models (gemma-3-270m's tokenizer, sliding windows shorter than
the prompt) written by qatune compute in llama.cpp what transformers computes; the tokenizer is llama.cpp's
`llama` vocabulary and tokenizes as qatune's does; a LoRA adapter GGUF on the base GGUF answers like the merged
model; what llama.cpp's gemma3 cannot compute is refused with the converter command; and the real embedded
gemma-3-270m, written from the weights qatune loads, answers as transformers does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="loading the GGUF back needs pip install 'qatune[llamacpp]'")

WINDOW = 16  # the sliding window: the prompt is over twice as long, so a wrong window changes every late logit
PROMPT = ("<start_of_turn>user\n发烧的时候应该怎么办？什么时候需要去看医生？ What should I do when I have a fever, "
          "and when should I see a doctor?<end_of_turn>\n<start_of_turn>model\n")
SLIDING, FULL = "sliding_attention", "full_attention"


def _tiny_gemma(tokenizer, seed: int = 0, **changes):
    """A tiny random Gemma 3: by default 6 layers in llama.cpp's own pattern (5 sliding, 1 global), tied embeddings,
    queries scaled by 1/sqrt(head size) as in every Gemma 3 but the 27B; norms away from zero, so the +1 counts."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=WINDOW, max_position_embeddings=1024, tie_word_embeddings=True,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**settings, **changes}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, gemma_tokenizer):
    folder = tmp_path_factory.mktemp("gemma-tokenizer")
    gemma_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, gemma_tokenizer, tokenizer_dir):
    """The default tiny Gemma 3 and its f32 GGUF."""
    from qatune.export.gguf import write_gguf

    model = _tiny_gemma(gemma_tokenizer)
    path = tmp_path_factory.mktemp("tiny-gemma-gguf") / "model.gguf"
    write_gguf(model, gemma_tokenizer, tokenizer_dir, path, "f32", "tiny-gemma")
    return model, path


def _prompt_ids(tokenizer) -> list[int]:
    ids = [tokenizer.bos_token_id, *tokenizer.encode(PROMPT, add_special_tokens=False)]
    assert len(ids) > 2 * WINDOW
    return ids


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_cpp(path, ids: list[int], lora=None) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits at every prompt position, and its 8 greedy tokens after the prompt."""
    from qatune.export.llamacpp import LlamaCppModel

    with LlamaCppModel(path, 256, lora) as loaded:
        loaded.llm.reset()
        loaded.llm.eval(ids)
        logits = np.asarray(loaded.llm.scores[:len(ids)]).copy()
        return logits, loaded.greedy(ids, 8, set())


def _assert_same(got: np.ndarray, want: np.ndarray, tolerance: float = 2e-3) -> float:
    """The largest difference is below `tolerance` (the tiny models' logits are below 1.5; llama.cpp's GELU alone,
    read from an f16 table, moves them by ~1e-3), and the top token is the same wherever it leads by more than
    twice the largest difference (of 262,144 random logits the first two are often closer)."""
    error = float(np.abs(got - want).max())
    assert error < tolerance, error
    top_two = np.partition(want, -2, axis=-1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * error
    assert clear.mean() > 0.5 and (got.argmax(-1) == want.argmax(-1))[clear].all()
    return error


def _assert_greedy(model, ids: list[int], answer: list[int], tolerance: float = 2e-3) -> None:
    """llama.cpp's greedy `answer` is transformers' greedy answer: each token is transformers' top token after the
    tokens before it, or within the tolerance of it (a near tie either may break its own way)."""
    logits = _logits(model, ids + answer)[len(ids) - 1:-1]
    chosen = logits[np.arange(len(answer)), answer]
    assert len(answer) == 8 and (logits.max(-1) - chosen <= 2 * tolerance).all()


def test_tiny_gemma3_computes_in_llama_cpp_what_transformers_does(tiny_gguf, gemma_tokenizer):
    from gguf import GGUFReader

    model, path = tiny_gguf
    ids = _prompt_ids(gemma_tokenizer)
    want = _logits(model, ids)
    got, greedy = _llama_cpp(path, ids)
    error = _assert_same(got, want)
    _assert_greedy(model, ids, greedy)
    # The window is real at these positions: without it transformers computes otherwise.
    from transformers import Gemma3ForCausalLM

    unwindowed = Gemma3ForCausalLM(model.config.__class__(**{**model.config.to_dict(), "sliding_window": 1024}))
    unwindowed.load_state_dict(model.state_dict())
    assert np.abs(_logits(unwindowed.eval(), ids) - want).max() > 20 * error
    fields = GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.attention.sliding_window"].contents() == WINDOW
    assert "gemma3.attention.sliding_window_pattern" not in fields  # llama.cpp's own pattern: as its converter
    assert "output.weight" not in {t.name for t in GGUFReader(str(path)).tensors}  # tied


def test_a_layer_pattern_of_its_own_untied_output_and_soft_capping(gemma_tokenizer, tokenizer_dir, tmp_path):
    """Four layers, three sliding then one global (llama.cpp's default would make all four sliding): the pattern is
    written out; an output matrix of its own; final logits soft-capped (tanh(logit / 2) * 2)."""
    from gguf import GGUFReader

    from qatune.export.gguf import write_gguf

    model = _tiny_gemma(gemma_tokenizer, 1, num_hidden_layers=4, layer_types=[SLIDING] * 3 + [FULL],
                        tie_word_embeddings=False, final_logit_softcapping=2.0)
    write_gguf(model, gemma_tokenizer, tokenizer_dir, tmp_path / "model.gguf", "f32", "tiny")
    ids = _prompt_ids(gemma_tokenizer)
    want = _logits(model, ids)
    got, greedy = _llama_cpp(tmp_path / "model.gguf", ids)
    error = _assert_same(got, want)
    _assert_greedy(model, ids, greedy)
    model.config.final_logit_softcapping = None
    assert np.abs(_logits(model, ids) - want).max() > 20 * error  # the cap counts
    reader = GGUFReader(str(tmp_path / "model.gguf"))
    assert list(reader.fields["gemma3.attention.sliding_window_pattern"].contents()) == [True, True, True, False]
    assert "output.weight" in {t.name for t in reader.tensors}


def test_f16_gguf_computes_what_transformers_does_with_f16_weights(gemma_tokenizer, tokenizer_dir, tmp_path):
    from qatune.export.gguf import write_gguf

    model = _tiny_gemma(gemma_tokenizer)
    write_gguf(model, gemma_tokenizer, tokenizer_dir, tmp_path / "model.gguf", "f16", "tiny")
    rounded = _tiny_gemma(gemma_tokenizer)
    with torch.no_grad():  # the weights the file holds: matrices in f16, norms in f32
        for parameter in rounded.parameters():
            if parameter.ndim > 1:
                parameter.copy_(parameter.half().float())
    ids = _prompt_ids(gemma_tokenizer)
    got, greedy = _llama_cpp(tmp_path / "model.gguf", ids)
    _assert_same(got, _logits(rounded, ids), tolerance=1e-2)
    _assert_greedy(rounded, ids, greedy, tolerance=1e-2)


TEXTS = ["hello world", "  two spaces, then\n\nnew lines\n\n\nand   three", "年假可以跨年使用吗？公司规定是怎样的呢",
         "emoji 🙂 and tabs\tand ünïcödé", "<start_of_turn>model\nSure.<end_of_turn>\n", "1234567 + 89 = ?"]


def test_the_tokenizer_is_llama_cpps_llama_vocabulary_and_tokenizes_as_qatune(tiny_gguf, gemma_tokenizer):
    """As llama.cpp's converter writes Gemma's: `llama` vocabulary with scores and types, <bos> added, no space
    prefix; <end_of_turn> ends a turn in llama.cpp by its text. Its tokens are qatune's tokens."""
    import llama_cpp
    from gguf import GGUFReader

    from qatune.export.llamacpp import LlamaCppModel

    _, path = tiny_gguf
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert fields["tokenizer.ggml.bos_token_id"].contents() == gemma_tokenizer.bos_token_id
    assert "<start_of_turn>" in fields["tokenizer.chat_template"].contents()
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    end_of_turn = gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokens[end_of_turn] == "<end_of_turn>" and types[end_of_turn] == 3  # control
    assert types[gemma_tokenizer.convert_tokens_to_ids("<0x41>")] == 6  # byte
    with LlamaCppModel(path, 64) as loaded:
        for text in TEXTS:
            assert loaded.tokenize(text) == gemma_tokenizer.encode(text, add_special_tokens=False), text
        assert loaded.llm.tokenize(b"hi", add_bos=True, special=False)[0] == gemma_tokenizer.bos_token_id
        assert llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(loaded.llm.model), end_of_turn)


def test_lora_adapter_gguf_on_the_base_gguf_answers_like_the_merged_model(tiny_gguf, gemma_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from qatune.export.gguf import write_lora_gguf

    base, base_gguf = tiny_gguf
    ids = _prompt_ids(gemma_tokenizer)
    torch.manual_seed(3)
    peft_model = get_peft_model(_tiny_gemma(gemma_tokenizer), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter's size: it changes the answer without drowning the base
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.3)
    peft_model.save_pretrained(tmp_path / "lora")
    write_lora_gguf(tmp_path / "lora", base.config, tmp_path / "adapter.gguf", "tiny-lora")
    merged = peft_model.merge_and_unload().eval()
    want = _logits(merged, ids)
    assert np.abs(want - _logits(base, ids)).max() > 0.05  # the adapter changes the answer
    got, greedy = _llama_cpp(base_gguf, ids, lora=tmp_path / "adapter.gguf")
    _assert_same(got, want, tolerance=5e-3)  # larger activations: GELU's f16 table errs more (a wrong layout: ~0.5)
    _assert_greedy(merged, ids, greedy, tolerance=5e-3)


@pytest.mark.parametrize("change, message", [
    (dict(query_pre_attn_scalar=256), "query_pre_attn_scalar 256"),
    (dict(attn_logit_softcapping=50.0), "attention logit soft-capping"),
    (dict(hidden_activation="gelu"), "activation 'gelu'"),
    (dict(rope_parameters={FULL: {"rope_type": "default", "rope_theta": 1e6},
                           SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}), "sliding-window layers"),
    (dict(rope_parameters={FULL: {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                                  "original_max_position_embeddings": 256},
                           SLIDING: {"rope_type": "default", "rope_theta": 1e4}}), "rope scaling 'yarn'"),
], ids=["attention-scale", "attention-softcap", "activation", "sliding-rope", "global-rope"])
def test_what_llama_cpp_cannot_compute_is_refused_with_the_converter_command(change, message, gemma_tokenizer,
                                                                           tokenizer_dir, tmp_path):
    from qatune.errors import GGUFExportError
    from qatune.export.gguf import write_gguf

    model = _tiny_gemma(gemma_tokenizer, vocab_size=300, **change)  # refused before any tensor or token is read
    with pytest.raises(GGUFExportError, match=message) as info:
        write_gguf(model, gemma_tokenizer, tokenizer_dir, tmp_path / "x.gguf", "f16", "x")
    assert f"python convert_hf_to_gguf.py {tokenizer_dir} --outfile" in str(info.value)
    assert not (tmp_path / "x.gguf").exists()


def test_the_shared_tiny_gemma_fixture_is_refused_for_its_attention_scale(tiny_gemma_dir, gemma_tokenizer, tmp_path):
    """conftest's tiny Gemma keeps transformers' default query_pre_attn_scalar (256) beside a head size of 16:
    llama.cpp would scale its queries by 1/4, transformers by 1/16."""
    from transformers import AutoModelForCausalLM

    from qatune.errors import GGUFExportError
    from qatune.export.gguf import write_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir)
    with pytest.raises(GGUFExportError, match=r"1/sqrt\(16\)"):
        write_gguf(model, gemma_tokenizer, tiny_gemma_dir, tmp_path / "x.gguf", "f16", "x")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_embedded_gemma_written_by_qatune_answers_as_transformers(tmp_path, gemma_tokenizer):
    """gemma-3-270m from the weights qatune loads, as an f16 GGUF: llama.cpp's greedy answers to an English and a
    Chinese question are transformers' (each answer token is transformers' argmax after the tokens before it)."""
    from qatune.config import ModelConfig
    from qatune.export.gguf import write_gguf
    from qatune.export.llamacpp import LlamaCppModel
    from qatune.infer.generation import prompt_ids
    from qatune.models import GEMMA_MODEL, load_model

    model = load_model(ModelConfig(name_or_path=GEMMA_MODEL), torch.float32).eval()
    gemma_tokenizer.save_pretrained(tmp_path)
    write_gguf(model, gemma_tokenizer, tmp_path, tmp_path / "gemma.gguf", "f16", GEMMA_MODEL)
    questions = ["What is the capital of France?", "中国的首都是哪里？"]
    prompts = [prompt_ids(gemma_tokenizer, gemma_tokenizer.chat_template, [{"role": "user", "content": q}])
               for q in questions]
    with LlamaCppModel(tmp_path / "gemma.gguf", 256) as loaded:
        answers = [loaded.greedy(p, 12, set()) for p in prompts]
    for prompt, answer in zip(prompts, answers):
        assert len(answer) == 12
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == answer


@pytest.mark.slow
def test_export_of_a_lora_on_the_embedded_gemma_is_checked_in_llama_cpp(tmp_path):
    """`qatune export --gguf f16 --gguf-adapter` on gemma-3-270m with a LoRA: the merged f16 GGUF and the adapter
    GGUF on the base GGUF answer the check questions in llama.cpp as the merged model does (token for token, or
    apart only at a near tie), llama.cpp tokenizes the Gemma turn prompts as qatune does, and the file carries
    the turn template."""
    import io

    from gguf import GGUFReader
    from peft import LoraConfig, get_peft_model
    from rich.console import Console

    from qatune.config import ModelConfig, load_config
    from qatune.export.run import export
    from qatune.models import GEMMA_MODEL, load_model, load_tokenizer
    from qatune.runtime import Runtime

    gemma = ModelConfig(name_or_path=GEMMA_MODEL)
    torch.manual_seed(0)
    peft_model = get_peft_model(load_model(gemma, torch.float32), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter's size
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    peft_model.save_pretrained(tmp_path / "lora")
    load_tokenizer(gemma).save_pretrained(tmp_path / "lora")
    config = load_config(None, [f"model={GEMMA_MODEL}", f"export.adapter={tmp_path / 'lora'}",
                                f"export.output_dir={tmp_path / 'out'}", "export.gguf=f16", "export.gguf_adapter=true",
                                "export.check_max_new_tokens=12"])
    result = export(config, Runtime(device="cpu", console=Console(file=io.StringIO())))
    checks = result.report.checks
    for key in ("gguf", "gguf adapter"):
        check = checks[key]
        assert check["engine"] == "llama.cpp" and check["identical"] + check["near_ties"] == check["questions"] >= 2
        assert all(a["llama_cpp_tokenizer_agrees"] for a in check["answers"])
    out = result.output_dir
    fields = GGUFReader(str(out / "model-f16.gguf")).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert "<start_of_turn>" in fields["tokenizer.chat_template"].contents()
    assert 'PARAMETER stop "<end_of_turn>"' in (out / "Modelfile").read_text()

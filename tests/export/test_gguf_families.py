"""The GGUF writer beyond SmolLM: tiny random Llama 3.1 (llama3 rope scaling), Mistral, Qwen2 and Qwen3 models,
written by qatune and loaded back in llama.cpp, compute what transformers computes; the rest is refused
with the converter command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="loading the GGUF back needs pip install 'qatune[llamacpp]'")

PROMPT = "<|im_start|>user\nWhat should I do when I have a fever, and when should I see a doctor about it?" \
         "<|im_end|>\n<|im_start|>assistant\n"
SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True)


def _tiny(family: str, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  **SIZE)
    torch.manual_seed(0)
    if family == "llama3.1":  # Llama 3.1's rope scaling, with an original context short enough to matter here
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
        model = LlamaForCausalLM(LlamaConfig(rope_parameters=rope, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen3":  # a head size other than hidden / heads, as Qwen3's own (128 at 1024 / 16)
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=32, sliding_window=None, **common))
        with torch.no_grad():  # the per-head q/k norms start at one: make them count
            for name, parameter in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    parameter.uniform_(0.5, 1.5)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # biases are initialised to zero: make them count
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0, 0.5)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3.1", "mistral", "qwen2", "qwen3"])
def test_family_written_by_qatune_computes_in_llama_cpp_what_transformers_does(family, tokenizer, tiny_model_dir,
                                                                               tmp_path):
    from gguf import GGUFReader

    from qatune.export.gguf import write_gguf
    from qatune.export.llamacpp import LlamaCppModel

    model = _tiny(family, tokenizer)
    write_gguf(model, tokenizer, tiny_model_dir, tmp_path / "model.gguf", "f32", family)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCppModel(tmp_path / "model.gguf", 256) as loaded:
        assert loaded.tokenize(PROMPT) == ids
        loaded.llm.reset()
        loaded.llm.eval(ids)
        got = np.asarray(loaded.llm.scores[:len(ids)])
        greedy = loaded.greedy(ids, 8, set())
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, temperature=None, top_p=None,
                             top_k=None, eos_token_id=None, pad_token_id=0)
    assert greedy == out[0, len(ids):].tolist()
    fields = GGUFReader(str(tmp_path / "model.gguf")).fields
    assert fields["general.architecture"].contents() == (family if family.startswith("qwen") else "llama")
    if family == "llama3.1":  # the scaling is real at these positions: without it transformers differs
        from transformers import LlamaConfig, LlamaForCausalLM

        plain = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "rope_parameters": None}))
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            unscaled = plain.eval()(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(unscaled - want).max() > 20 * np.abs(got - want).max()


def test_unsupported_models_are_refused_with_the_converter_command(tokenizer, tiny_model_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from qatune.errors import GGUFExportError
    from qatune.export.gguf import write_gguf

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(GGUFExportError, match="'gpt2'") as info:
        write_gguf(gpt2, tokenizer, tiny_model_dir, tmp_path / "x.gguf", "f16", "x")
    assert f"python convert_hf_to_gguf.py {tiny_model_dir} --outfile" in str(info.value)
    yarn = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128), **SIZE))
    with pytest.raises(GGUFExportError, match="rope scaling 'yarn'"):
        write_gguf(yarn, tokenizer, tiny_model_dir, tmp_path / "x.gguf", "f16", "x")
    # Llama 2 / Mistral v0.1 tokenizers: SentencePiece BPE with byte fallback, not byte-level BPE.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    spm = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(
        vocab={"<unk>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")], byte_fallback=True, unk_token="<unk>")))
    with pytest.raises(GGUFExportError, match="SentencePiece BPE") as info:
        write_gguf(_tiny("mistral", tokenizer), spm, tiny_model_dir, tmp_path / "x.gguf", "f16", "x")
    assert "convert_hf_to_gguf.py" in str(info.value)
    assert not (tmp_path / "x.gguf").exists()

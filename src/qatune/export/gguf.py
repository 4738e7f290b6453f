"""GGUF for llama.cpp and Ollama, written with the `gguf` package's writer, and an Ollama Modelfile.

The layout follows llama.cpp's own converter for the llama architecture: `blk.N.attn_q.weight`
style names (the `gguf` package's tensor-name map), query and key weights permuted to llama.cpp's
rotary layout, 1-D tensors (norms) in f32, the tied output matrix left out, and the BPE
tokenizer (tokens, token types, merges, special ids, chat template) as metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.errors import QatuneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qatune.config import DecodingConfig

class GGUFExportError(QatuneError):
    """A model this GGUF writer cannot express."""


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout for q/k: each head's halves interleaved (its converter's `permute`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", tokenizer_dir: Path, path: Path,
               qtype: str, name: str, pre_tokenizer: str = "default") -> None:
    """Write `model` (a plain, merged llama model) and its tokenizer to `path` as f16 or q8_0."""
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type != "llama":
        raise GGUFExportError(f"GGUF export writes the llama architecture; this model is {cfg.model_type!r}",
                              hint="export the merged Hugging Face folder and convert it with llama.cpp's "
                                   "convert_hf_to_gguf.py")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope scaling {rope.get('rope_type')!r} is not written by this GGUF exporter",
                              hint="convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer, tokenizer_dir, cfg.vocab_size, pre_tokenizer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from token_embd when the file has none
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for the tensor {hf_name!r}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: Any, tokenizer: "PreTrainedTokenizerBase", tokenizer_dir: Path, vocab_size: int,
                   pre_tokenizer: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id, their types, merges, specials."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_type = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if model_type != "BPE":
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen); this one is "
                              f"{model_type}", hint="convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special or (i in added and tokenizer.added_tokens_decoder[i].special)
                         else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, bos/eos/unk/pad ids, add_bos and the chat template, as llama.cpp's converter reads them.
    special_vocab = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    if not special_vocab.merges:
        raise GGUFExportError(f"no BPE merges found in {tokenizer_dir}/tokenizer.json")
    special_vocab.add_to_gguf(writer)
    if isinstance(tokenizer.chat_template, str) and not special_vocab.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def source_pre_tokenizer(gguf_path: Path) -> str | None:
    """`tokenizer.ggml.pre` of an existing GGUF file (the base the model came from), if it has one."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


# Ollama's Go-template form of the chat formats whose end-of-turn token we recognise; for others
# Ollama falls back on the chat template stored in the GGUF metadata.
_OLLAMA_TEMPLATES = {
    "<|im_end|>": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "<|eot_id|>": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}


def modelfile(gguf_name: str, end_of_turn: str, decoding: "DecodingConfig") -> str:
    """An Ollama Modelfile for the GGUF beside it: `ollama create NAME -f Modelfile`. Its sampling is
    `decoding` (export passes serve.decoding: Ollama answers as `qatune serve` would)."""
    lines = ["# ollama create my-assistant -f Modelfile && ollama run my-assistant", f"FROM ./{gguf_name}"]
    template = _OLLAMA_TEMPLATES.get(end_of_turn.strip())
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# TEMPLATE: none written; Ollama uses the chat template stored in the GGUF file")
    lines += [f'PARAMETER stop "{end_of_turn.strip()}"', f"PARAMETER temperature {decoding.temperature}",
              f"PARAMETER top_p {decoding.top_p}"]
    return "\n".join(lines) + "\n"

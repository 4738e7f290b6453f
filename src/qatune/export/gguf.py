"""GGUF for llama.cpp and Ollama, written with the `gguf` package's writer, and an Ollama Modelfile.

The layout follows llama.cpp's own converter for the llama architecture (Llama, Llama 3.1's rope
scaling as `rope_freqs`, Mistral), qwen2 (Qwen2/2.5, attention biases), qwen3 (per-head q/k norms,
a head size of its own) and gemma3 (text-only Gemma 3, gemma-3-270m: its converter's Gemma3Model):
`blk.N.attn_q.weight` style names (the `gguf` package's tensor-name map), llama's query and key
weights permuted to llama.cpp's rotary layout, 1-D tensors (norms, biases) in f32, the tied output
matrix left out, and the tokenizer as metadata: byte-level BPE (tokens, types, merges, special ids,
chat template) as llama.cpp's `gpt2` vocabulary, Gemma's SentencePiece-style one as its `llama`
vocabulary (scores and types). A peft LoRA adapter becomes a llama.cpp LoRA adapter GGUF
(`write_lora_gguf`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.errors import GGUFExportError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from qatune.config import DecodingConfig

def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout for q/k: each head's halves interleaved (its converter's `permute`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# What `write_gguf` writes itself (the `gguf` package's encoders), and what llama.cpp's own
# quantizer makes from an f16 file written first (k-quants need its importance-weighted search).
WRITER_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
# Hugging Face model types written: llama.cpp architecture, and whether q/k rows are permuted into
# llama.cpp's interleaved rotary layout (llama) or kept in the halves layout its qwen2 (NEOX) rope reads.
# A multimodal Gemma 3 (`gemma3`, a vision tower beside its text model) is left to llama.cpp's converter,
# which writes the vision projector as a file of its own.
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "gemma3_text": ("gemma3", False)}
WRITTEN = "Llama (3.x included), Mistral, Qwen2/2.5, Qwen3 and text-only Gemma 3 (gemma3_text)"


def _arch_names() -> dict[str, Any]:
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
            "gemma3": gguf.MODEL_ARCH.GEMMA3}


def write_gguf(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", tokenizer_dir: Path, path: Path,
               qtype: str, name: str, pre_tokenizer: str = "default") -> None:
    """Write `model` (a plain Llama, Mistral, Qwen2, Qwen3 or text-only Gemma 3 model, or a peft model: its base
    weights) and its tokenizer to `path`.

    `qtype`: f32, f16, bf16 or q8_0 written here; q4_k_m, q5_k_m or q6_k through llama.cpp's quantizer
    from an f16 file written first beside `path` and deleted after (needs llama-cpp-python)."""
    if qtype in K_QUANTS:
        from qatune.export.llamacpp import quantize_gguf, require_llama_cpp

        require_llama_cpp(f"a {qtype} GGUF")
        f16 = path.with_name(f".{path.name}.f16")
        try:
            write_gguf(model, tokenizer, tokenizer_dir, f16, "f16", name, pre_tokenizer)
            quantize_gguf(f16, path, qtype)
        finally:
            f16.unlink(missing_ok=True)
        return
    import gguf

    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        raise GGUFExportError(f"this GGUF writer writes {WRITTEN} models; this one is {cfg.model_type!r}",
                              hint=converter_command(tokenizer_dir))
    arch, permuted = ARCHITECTURES[cfg.model_type]
    rope = _rope(cfg)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3") or (rope_type == "llama3" and arch != "llama"):
        raise GGUFExportError(f"rope scaling {rope_type!r} is not written by this GGUF writer (it writes none, "
                              "and Llama 3.1's llama3)", hint=converter_command(tokenizer_dir))
    problem = _gemma3_problem(cfg) if arch == "gemma3" else None
    if problem:
        raise GGUFExportError(f"this Gemma 3 cannot be written as llama.cpp's gemma3: {problem}",
                              hint=converter_command(tokenizer_dir))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]

    writer = gguf.GGUFWriter(str(path), arch)
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
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    if arch == "gemma3":
        _add_gemma3_keys(writer, cfg)
        _add_sentencepiece_tokenizer(writer, tokenizer, tokenizer_dir, cfg.vocab_size)
    else:
        _add_tokenizer(writer, tokenizer, tokenizer_dir, cfg.vocab_size, pre_tokenizer)

    names = gguf.get_tensor_name_map(_arch_names()[arch], cfg.num_hidden_layers)
    if rope_type == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_factors(rope, head_dim))
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in _plain_state_dict(model).items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from token_embd when the file has none
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for the tensor {hf_name!r}")
        data = tensor.detach().float().cpu().numpy()
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        _add_encoded(writer, gguf_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope(cfg: Any) -> dict[str, Any]:
    """The rope parameters of the global layers: Gemma 3 keeps one set per attention type (the sliding layers'
    are `_gemma3_problem`'s and `_add_gemma3_keys`' business), the others one for every layer."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _swa_layers(cfg: Any) -> list[bool]:
    """Which layers attend within the sliding window."""
    return [kind == "sliding_attention" for kind in cfg.layer_types]


def _gemma3_problem(cfg: Any) -> str | None:
    """What in a Gemma 3 config llama.cpp's gemma3 would not compute as transformers does, or None."""
    kinds = set(cfg.layer_types)
    if not kinds <= {"sliding_attention", "full_attention"}:
        return f"layer types {sorted(kinds)} (llama.cpp knows sliding_attention and full_attention)"
    sliding_rope = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if sliding_rope.get("rope_type", "default") != "default":
        return f"rope scaling {sliding_rope['rope_type']!r} on the sliding-window layers (llama.cpp reads none there)"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping (llama.cpp's gemma3 computes none)"
    if any(_swa_layers(cfg)) and not cfg.sliding_window:
        return "sliding_attention layers without a sliding_window"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention (an embedding model: llama.cpp's gemma-embedding architecture)"
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        return f"the activation {cfg.hidden_activation!r} (llama.cpp's gemma3 computes tanh-approximated GELU)"
    # llama.cpp does not read the attention scale: 1/sqrt(head size), or 1/sqrt(width / heads) at 62 layers (27B).
    assumed = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == 62 else cfg.head_dim
    if not math.isclose(cfg.query_pre_attn_scalar, assumed):
        return (f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} (llama.cpp scales the queries by 1/sqrt({assumed}) "
                f"for a model of {cfg.num_hidden_layers} layers)")
    return None


def _add_gemma3_keys(writer: Any, cfg: Any) -> None:
    """What llama.cpp's gemma3 reads beyond the common keys. Without a pattern key it makes every 6th layer global:
    the pattern is written only where the layers differ from that (as the converter, which never writes it)."""
    sliding_rope = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}
    writer.add_rope_freq_base_swa(float(sliding_rope.get("rope_theta", 10000.0)))
    if cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    swa = _swa_layers(cfg)
    if any(swa):  # no window key: llama.cpp attends globally in every layer
        writer.add_sliding_window(cfg.sliding_window)
        if swa != [i % 6 < 5 for i in range(len(swa))]:
            writer.add_sliding_window_pattern(swa)


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> Any:
    """Llama 3.1's rope scaling as llama.cpp's `rope_freqs` tensor: per frequency, the divisor of its
    rotation (1 for high frequencies, `factor` for low ones, smoothed between), as its converter writes it."""
    import numpy as np

    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    divisors = np.where(wavelen < old_context / high, 1.0,
                        np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return divisors.astype(np.float32)


def converter_command(folder: Path) -> str:
    """What to run instead: llama.cpp's own converter on the merged folder, then its quantizer."""
    return (f"export without --gguf, then convert {folder} with llama.cpp's converter: python convert_hf_to_gguf.py "
            f"{folder} --outfile {folder}/model-f16.gguf --outtype f16 (and llama-quantize for a k-quant)")


def _add_encoded(writer: Any, name: str, data: Any, qtype: str) -> None:
    """A tensor in `qtype`, where its shape allows: 1-D tensors (norms) stay f32, as llama.cpp's converter keeps them."""
    import gguf
    import numpy as np

    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(qtype)
    if data.ndim == 1 or qtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif kind is not None and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _plain_state_dict(model: Any) -> dict[str, Any]:
    """The model's weights under the base model's names; a peft model gives its base weights, adapters left out."""
    if not hasattr(model, "peft_config"):
        return model.state_dict()
    return {key.replace(".base_layer.", "."): value for key, value in model.get_base_model().state_dict().items()
            if ".lora_" not in key}


def _add_tokenizer(writer: Any, tokenizer: "PreTrainedTokenizerBase", tokenizer_dir: Path, vocab_size: int,
                   pre_tokenizer: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id, their types, merges, specials."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_type = type(backend.model).__name__ if backend is not None else type(tokenizer).__name__
    if model_type == "BPE" and getattr(backend.model, "byte_fallback", False):
        model_type = "SentencePiece BPE (byte fallback)"  # Llama 2, Mistral v0.1: llama.cpp's `llama` vocabulary
    if model_type != "BPE":
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen); this one is "
                              f"{model_type}", hint=converter_command(tokenizer_dir))
    if pre_tokenizer == "default":
        pre_tokenizer = _known_pre_tokenizer(backend) or pre_tokenizer
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


def _add_sentencepiece_tokenizer(writer: Any, tokenizer: "PreTrainedTokenizerBase", tokenizer_dir: Path,
                                 vocab_size: int) -> None:
    """Gemma's tokenizer (SentencePiece BPE with byte fallback, in tokenizer.json) as llama.cpp's `llama` vocabulary,
    as its converter writes one from tokenizer.model: pieces by id with scores and types, added tokens scored -1000
    as control (special) or user-defined (their spaces unescaped) tokens, no space prefix, specials and add_bos.

    llama.cpp merges the adjacent pair whose joined piece scores highest; tokenizer.json keeps no scores but ranks
    its merges, so a piece scores minus the rank of the first merge that makes it, and llama.cpp merges in the
    order transformers does. <end_of_turn> needs no key: llama.cpp ends a turn at it by its text."""
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or not getattr(backend.model, "byte_fallback", False):
        raise GGUFExportError("a Gemma 3 GGUF is written with Gemma's SentencePiece-style tokenizer (BPE with byte "
                              "fallback); this one is another kind", hint=converter_command(tokenizer_dir))
    merges = json.loads(backend.to_str())["model"]["merges"]
    first_merge: dict[str, int] = {}
    for rank, pair in enumerate(merges):
        left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
        first_merge.setdefault(left + right, rank)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            control = added[i].special or _looks_special(token)
            tokens.append(token if control else token.replace("\u2581", " "))
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            tokens.append(token)
            scores.append(0.0 if byte else -float(first_merge.get(token, len(merges))))
            types.append(gguf.TokenType.BYTE if byte else gguf.TokenType.UNKNOWN if i == tokenizer.unk_token_id
                         else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    special_vocab = gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=vocab_size)
    special_vocab.add_to_gguf(writer)  # bos/eos/unk/pad ids, add_bos (Gemma's post-processor adds <bos>)
    if isinstance(tokenizer.chat_template, str) and not special_vocab.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even where a model marks them not special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_lora_gguf(adapter_dir: Path, base_config: Any, path: Path, name: str) -> None:
    """The peft LoRA adapter in `adapter_dir` as a llama.cpp LoRA adapter GGUF for a base with `base_config`
    (its Hugging Face config), as llama.cpp's convert_lora_to_gguf.py writes one: general.type `adapter`,
    adapter.type `lora`, adapter.lora.alpha, and `<base tensor>.lora_a` / `.lora_b` per adapted matrix
    (B's rows permuted like the q/k weights they add to). llama.cpp scales each pair by alpha / rank;
    where peft scales otherwise (rsLoRA's alpha / sqrt(rank)) B carries the difference, so the adapter
    adds exactly what peft adds. Loads with `llama-cli -m BASE.gguf --lora FILE`, Ollama's ADAPTER line,
    or `Llama(model_path=BASE, lora_path=FILE)`."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    settings = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS
    problem = lora_gguf_problem(settings, base_config) or (None if weights_file.is_file() else
                                                           f"{weights_file} is missing")
    if problem:
        raise GGUFExportError(f"the adapter {adapter_dir} cannot be written as a GGUF LoRA adapter: {problem}",
                              hint="export it merged instead: qatune export --adapter A --gguf f16")
    alpha = float(settings["lora_alpha"])
    n_head, n_kv = base_config.num_attention_heads, base_config.num_key_value_heads
    arch, permuted = ARCHITECTURES[base_config.model_type]
    names = gguf.get_tensor_name_map(_arch_names()[arch], base_config.num_hidden_layers)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        side = "a" if ".lora_A." in key else "b" if ".lora_B." in key else None
        if side is None or not key.endswith(".weight"):
            raise GGUFExportError(f"{weights_file}: {key!r} is not a LoRA A or B matrix, which a GGUF LoRA "
                                  "adapter cannot hold", hint="export it merged instead: --gguf f16")
        base_name = key.removeprefix("base_model.model.").replace(f".lora_{side.upper()}.weight", ".weight")
        pairs.setdefault(base_name, {})[side] = tensor.astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for base_name, pair in sorted(pairs.items()):
        gguf_name = names.get_name(base_name, try_suffixes=(".weight",))
        if gguf_name is None or set(pair) != {"a", "b"}:
            raise GGUFExportError(f"{weights_file}: no GGUF tensor for the adapted {base_name!r}"
                                  if gguf_name is None else f"{weights_file}: {base_name!r} lacks its LoRA "
                                  f"{'A' if 'a' not in pair else 'B'} matrix")
        lora_a, lora_b = pair["a"], pair["b"]
        rank = lora_a.shape[0]
        peft_scale = alpha / (rank ** 0.5 if settings.get("use_rslora") else rank)
        lora_b = lora_b * (peft_scale / (alpha / rank))  # 1.0 unless peft scales otherwise than llama.cpp
        if permuted and base_name.endswith("q_proj.weight"):
            lora_b = _permute(lora_b, n_head)
        elif permuted and base_name.endswith("k_proj.weight"):
            lora_b = _permute(lora_b, n_kv)
        writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(lora_a))
        writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(lora_b.astype(np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def lora_gguf_problem(settings: dict[str, Any], base_config: Any = None) -> str | None:
    """Why the adapter with these adapter_config.json `settings` (on a base with `base_config`, where
    known) cannot be a GGUF LoRA adapter, or None."""
    if settings.get("peft_type") != "LORA":
        return f"it is a {settings.get('peft_type')} adapter (only LoRA has a GGUF form)"
    if base_config is not None and getattr(base_config, "model_type", None) not in ARCHITECTURES:
        return f"its base is a {getattr(base_config, 'model_type', None)!r} model ({WRITTEN} are written)"
    for key, what in (("use_dora", "DoRA"), ("modules_to_save", "fully trained modules (modules_to_save)"),
                      ("alpha_pattern", "per-module alphas (alpha_pattern)"), ("lora_bias", "LoRA biases")):
        if settings.get(key):
            return f"it uses {what}"
    if not settings.get("lora_alpha"):
        return "its lora_alpha is 0 or missing"
    if settings.get("bias", "none") != "none":
        return f"it trains biases (bias={settings['bias']!r})"
    return None


# The split regexes of the byte-level BPE families whose llama.cpp pre-tokenizer has a name.
_PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}


def _known_pre_tokenizer(backend: Any) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer (Llama 3's, Qwen2's), read from its split regex."""
    import json

    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    except (ValueError, AttributeError):
        return None
    for step in [pre, *pre.get("pretokenizers", [])]:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex in _PRE_TOKENIZER_REGEXES:
            return _PRE_TOKENIZER_REGEXES[regex]
    return None


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


def modelfile(gguf_name: str, end_of_turn: str, decoding: "DecodingConfig", adapter: str | None = None,
              file_name: str = "Modelfile") -> str:
    """An Ollama Modelfile for the GGUF beside it: `ollama create NAME -f Modelfile`. Its sampling is
    `decoding` (export passes serve.decoding: Ollama answers as `qatune serve` would). With `adapter`
    (a GGUF LoRA adapter beside it), `gguf_name` is the base and an ADAPTER line names the adapter."""
    lines = [f"# ollama create my-assistant -f {file_name} && ollama run my-assistant", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    template = _OLLAMA_TEMPLATES.get(end_of_turn.strip())
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# TEMPLATE: none written; Ollama uses the chat template stored in the GGUF file")
    lines += [f'PARAMETER stop "{end_of_turn.strip()}"', f"PARAMETER temperature {decoding.temperature}",
              f"PARAMETER top_p {decoding.top_p}"]
    return "\n".join(lines) + "\n"

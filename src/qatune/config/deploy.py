"""The `serve` and `export` sections: the HTTP service and the exported copies."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatune import plugins
from qatune.config.base import Section, decoding_section, secret_field
from qatune.config.data import SourceList

ServeDecoding = decoding_section(
    "ServeDecoding", "for requests that do not say, and by `qatune chat` / `qatune generate`",
    temperature=0.7, top_p=0.9,
)
# `auto` and every engine of the plug-in table (a Literal of a tuple: the choices as its arguments)
EngineChoice = Literal[("auto", *plugins.names("engine"))]  # type: ignore[valid-type]


class ServeConfig(Section):
    """`qatune serve` (the HTTP service), and the decoding of `qatune chat` and `qatune generate`."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose it (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    api_key: str | None = secret_field(
        None, "Require `Authorization: Bearer <key>` on the API routes when set (or env QATUNE_API_KEY)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served on the one base model, name: folder. Each name is a model in /v1/models; "
        "the first is the default for /answer and requests without `model`.",
    )
    engine: EngineChoice = Field(
        "auto", description="auto: llamacpp on a CPU where llama-cpp-python is installed, else hf; on a CUDA GPU "
        "vllm where installed, else hf (printed with the reason). hf: qatune's continuous batching on "
        "transformers (CPU or GPU); llamacpp: continuous batching on llama.cpp, GGUF models on the CPU "
        "(`pip install 'qatune[llamacpp]'`); vllm: vLLM on a CUDA GPU, or on the CPU with vLLM's CPU build "
        "(`make vllm`: .venv-vllm)."
    )
    llamacpp_context: int | None = Field(
        None, ge=64, description="llamacpp: key/value cache cells of each running request: the longest prompt "
        "plus answer it may have (400 above). null: serve.max_input_tokens + serve.max_tokens. The cache holds "
        "serve.max_batch_size + 1 of them per served model, allocated at start (SmolLM2-135M: 22.5 KiB a cell)."
    )
    llamacpp_threads: int | None = Field(
        None, ge=1, description="llamacpp: CPU threads; null: half the CPUs (llama-cpp-python's default)."
    )
    llamacpp_gguf: Literal["q8_0", "f16", "bf16"] = Field(
        "q8_0", description="llamacpp: the GGUF type a Hugging Face model, an adapter (merged) or `default` "
        "(whose shipped Q4_1 file batches at half the speed) is converted to, once (cached); a GGUF file or an "
        "export folder's GGUF is served as it is. q8_0: the fastest alone (half bf16's bytes a token); bf16: "
        "faster from 2 requests at once on a CPU with AVX512-BF16 (16 at once: ~1.5x q8_0's step), ~3x slower alone."
    )
    max_batch_size: int = Field(16, ge=1, description="Requests decoded together in one step.")
    max_queue: int = Field(
        64, ge=1, description="Requests admitted (being tokenized, waiting or running) before new ones get 503 "
        "with Retry-After."
    )
    request_timeout: float = Field(120.0, gt=0, description="Seconds before a request is stopped and answered 504.")
    max_input_tokens: int = Field(2048, ge=1, description="Longest accepted prompt (413 above).")
    max_tokens: int = Field(512, ge=1, description="Largest accepted `max_tokens` (400 above).")
    max_body_bytes: int = Field(
        2_097_152, ge=1024, description="Largest request body in bytes, refused with 413 while it is read, before "
        "any parsing (2 MiB holds far more text than serve.max_input_tokens).",
    )
    max_input_chars: int = Field(65_536, ge=1, description="Most characters of message text (or prompt) in one "
                                 "request, checked before tokenizing (413 above); keep it above 16 x max_input_tokens.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request (413 above).")
    max_stop_chars: int = Field(200, ge=1, description="Longest accepted stop string, in characters (400 above).")
    read_timeout: float = Field(
        10.0, gt=0, description="Seconds a client has to send a request's headers, and again its body; a "
        "half-sent request is then closed (headers) or answered 408 (body).",
    )
    limit_concurrency: int = Field(256, ge=1, description="Connections and requests uvicorn handles at once (503 above).")
    timeout_keep_alive: int = Field(5, ge=1, description="Seconds an idle keep-alive connection stays open.")
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request head (request line and headers) in bytes; larger is refused.",
    )
    abuse_refusals: int = Field(
        20, ge=0, description="Refused (4xx) requests from one client address in 10 s after which each of its "
        "new requests waits serve.abuse_delay first, so a client sending bad requests in a loop is slowed "
        "instead of taking the CPU from the others; 0: off.",
    )
    abuse_delay: float = Field(1.0, ge=0, description="Seconds each request of an abusive client address waits.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host header names accepted (400 for others). Empty: when bound to "
        "loopback only localhost, 127.0.0.1 and ::1 (against DNS rebinding); otherwise any name.",
    )
    decoding: ServeDecoding = Field(
        default_factory=ServeDecoding, description="Defaults of a request that does not say (and of chat/generate)."
    )


class ExportConfig(Section):
    """`qatune export`: merged weights, GGUF, quantized copies."""

    adapter: str | None = Field(None, description="Adapter folder (a lora/qlora training output) to merge into the model.")
    output_dir: str = Field("outputs/export", description="Folder to write; it must be empty unless `overwrite`. "
                            "Never the model, the adapter or its base, nor a folder holding one.")
    overwrite: bool = Field(False, description="Replace a non-empty output folder (`--force`).")
    gguf: Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"] | None = Field(
        None, description="Also write a GGUF file for llama.cpp and Ollama (with a Modelfile): f16, bf16 or q8_0 "
        "(written by qatune), or the k-quants q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer; `pip install "
        "'qatune[llamacpp]'`). With llama.cpp installed the export checks the file in llama.cpp itself."
    )
    gguf_adapter: bool = Field(
        False, description="Also write the LoRA adapter itself as a llama.cpp GGUF adapter (adapter.gguf), the "
        "base it goes on as a GGUF (base-<export.gguf or f16>.gguf) and an Ollama Modelfile.adapter with FROM and "
        "ADAPTER lines; needs export.adapter."
    )
    perplexity_data: SourceList = Field(
        default_factory=list, description="Held-out Q&A (any format eval.data reads) on whose answers each GGUF "
        "file's perplexity is measured in llama.cpp; empty: the validation split prepared in data.output_dir, "
        "where there is one."
    )
    perplexity_records: int = Field(32, ge=1, description="Held-out records the GGUF perplexity is measured on "
                                    "(the first ones).")
    quantize: Literal["int8", "bnb-8bit", "bnb-4bit"] | None = Field(
        None, description="Also write a quantized copy: int8 (torchao dynamic, CPU), bnb-8bit or bnb-4bit (bitsandbytes >= 0.50: CUDA "
        "or CPU)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the merged safetensors; `auto` keeps the base model's own."
    )
    max_shard_size: str = Field("2GB", description="Split safetensors files above this size.")
    check_questions: list[str] = Field(
        default_factory=lambda: ["What should I do when I have a fever?", "感冒了应该注意什么？"],
        description="Questions answered greedily by every exported form and compared with base + adapter "
        "(without an adapter: with the model as loaded, the written folder read back).",
    )
    check_max_new_tokens: int = Field(32, ge=1, description="Length of the check answers.")

"""The `serve` and `export` sections: the HTTP service and the exported copies."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatune.config.base import Section, decoding_section

ServeDecoding = decoding_section(
    "ServeDecoding", "for requests that do not say, and by `qatune chat` / `qatune generate`",
    temperature=0.7, top_p=0.9,
)


class ServeConfig(Section):
    """`qatune serve` (the HTTP service), and the decoding of `qatune chat` and `qatune generate`."""

    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose it (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` on the API routes when set (or env QATUNE_API_KEY)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served on the one base model, name: folder. Each name is a model in /v1/models; "
        "the first is the default for /answer and requests without `model`.",
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: qatune's continuous batching on transformers (CPU or GPU); vllm: vLLM on a CUDA GPU."
    )
    max_batch_size: int = Field(16, ge=1, description="Requests decoded together in one step.")
    max_queue: int = Field(
        64, ge=1, description="Requests waiting or running before new ones get 503 with Retry-After."
    )
    request_timeout: float = Field(120.0, gt=0, description="Seconds before a request is stopped and answered 504.")
    max_input_tokens: int = Field(2048, ge=1, description="Longest accepted prompt (413 above).")
    max_tokens: int = Field(512, ge=1, description="Largest accepted `max_tokens` (400 above).")
    decoding: ServeDecoding = Field(
        default_factory=ServeDecoding, description="Defaults of a request that does not say (and of chat/generate)."
    )


class ExportConfig(Section):
    """`qatune export`: merged weights, GGUF, quantized copies."""

    adapter: str | None = Field(None, description="Adapter folder (a lora/qlora training output) to merge into the model.")
    output_dir: str = Field("outputs/export", description="Folder to write; it must be empty unless `overwrite`.")
    overwrite: bool = Field(False, description="Replace a non-empty output folder (`--force`).")
    gguf: Literal["f16", "q8_0"] | None = Field(
        None, description="Also write a GGUF file for llama.cpp and Ollama (with a Modelfile): f16 or q8_0."
    )
    quantize: Literal["int8", "bnb-8bit", "bnb-4bit"] | None = Field(
        None, description="Also write a quantized copy: int8 (torchao dynamic, CPU), bnb-8bit or bnb-4bit (CUDA)."
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

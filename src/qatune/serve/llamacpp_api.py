"""llama.cpp's C API as llama-cpp-python binds it (`llama_cpp.llama_cpp`): the one module that calls it.

llama-cpp-python's high-level `Llama` runs one sequence per context; serving many at once needs
the C API underneath it: one context whose key/value cache holds a sequence id per request, one
`llama_decode` for a batch of tokens from many sequences, and a sampler chain per request. Three
small classes wrap what the engine uses, and free their C objects in `close`:

- `GGUFModel`: a GGUF file loaded on the CPU;
- `KVContext`: a context over it, with `decode` for several sequences at once, and copying and
  removing sequences;
- `TokenSampler`: repetition penalty, temperature, top-p and a seeded draw, or greedy.

Each sequence has a stream of its own in the cache (`kv_unified` off: `cells_per_sequence` cells
each), and flash attention is on. A sequence's attention then sums its own cells, in position
order, whatever else runs beside it, so batched greedy answers equal one-at-a-time ones token for
token. In one unified buffer a sequence's later tokens land in cells other sequences freed,
before its earlier ones, and the sums round differently (measured: 7 of 12 answers changed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qatune.compat.llama_cpp import model_params
from qatune.serve.protocol import ServeError

if TYPE_CHECKING:
    from qatune.serve.protocol import Sampling

# llama-cpp-python prints every llama.cpp log line to stderr until its logger is set higher.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed
FLASH_ATTENTION = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
CELL_BLOCK = 256  # llama.cpp rounds a context's size up to a multiple of this


def _api():
    import llama_cpp.llama_cpp as api

    return api


class GGUFModel:
    """A GGUF file loaded for the CPU."""

    def __init__(self, path: Path) -> None:
        api = _api()
        api.llama_backend_init()
        self.path = path
        self.pointer = api.llama_model_load_from_file(str(path).encode(), model_params(api))
        if not self.pointer:
            raise ServeError(f"llama.cpp cannot load {path}",
                             hint="check that the file is a complete GGUF model (qatune export --gguf writes one)")
        self.vocab = api.llama_model_get_vocab(self.pointer)
        self.n_vocab = api.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = api.llama_model_n_ctx_train(self.pointer)

    def close(self) -> None:
        if self.pointer:
            _api().llama_model_free(self.pointer)
            self.pointer = None


class KVContext:
    """A context with a key/value cache for `sequences` sequence ids of `cells` token cells each."""

    def __init__(self, model: GGUFModel, cells: int, sequences: int, batch_tokens: int, threads: int) -> None:
        api = _api()
        params = api.llama_context_default_params()
        cells = -(-cells // CELL_BLOCK) * CELL_BLOCK
        params.n_ctx = cells * sequences
        params.n_batch = batch_tokens
        params.n_ubatch = min(batch_tokens, 512)
        params.n_seq_max = sequences
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = FLASH_ATTENTION
        self.batch_tokens = batch_tokens
        self.pointer = api.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise ServeError(f"llama.cpp cannot make a key/value cache of {cells} cells for each of {sequences} "
                             "sequences", hint="lower serve.llamacpp_context or serve.max_batch_size")
        self.cells_per_sequence = api.llama_n_ctx_seq(self.pointer)
        self.memory = api.llama_get_memory(self.pointer)
        self.batch = api.llama_batch_init(batch_tokens, 0, 1)

    def decode(self, pieces: list[tuple[list[int], int, int]]) -> list[int]:
        """Run `(tokens, sequence id, position of the first token)` pieces in one llama_decode; the batch index of
        each piece's last token, whose logits a TokenSampler reads."""
        batch, n, last = self.batch, 0, []
        if sum(len(tokens) for tokens, _, _ in pieces) > self.batch_tokens:
            raise ValueError(f"more than {self.batch_tokens} tokens in one step")
        for tokens, sequence, position in pieces:
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = position + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = sequence
                batch.logits[n] = offset == len(tokens) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        status = _api().llama_decode(self.pointer, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}"
                               + (" (no room left in the key/value cache)" if status == 1 else ""))
        return last

    def copy_sequence(self, source: int, target: int) -> None:
        """`target` (empty) gets every cell of `source`: a prefix computed once."""
        _api().llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def drop_sequence(self, sequence: int) -> None:
        """Free every cell of `sequence`."""
        _api().llama_memory_seq_rm(self.memory, sequence, -1, -1)

    def clear(self) -> None:
        _api().llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self.pointer:
            api = _api()
            api.llama_batch_free(self.batch)
            api.llama_free(self.pointer)
            self.pointer = None


class TokenSampler:
    """One request's sampler chain: repetition penalty over prompt and answer, then greedy, or temperature,
    top-p and a draw seeded by the request (transformers' order of the same steps)."""

    def __init__(self, model: GGUFModel, sampling: "Sampling", history: list[int], greedy: bool) -> None:
        api = _api()
        self.pointer = api.llama_sampler_chain_init(api.llama_sampler_chain_default_params())

        def add(sampler: object) -> None:  # the chain owns (and frees) what is added to it
            api.llama_sampler_chain_add(self.pointer, sampler)

        if sampling.repetition_penalty != 1.0:
            add(api.llama_sampler_init_penalties(model.n_vocab, len(history) + sampling.max_new_tokens,
                                                 sampling.repetition_penalty, 0.0, 0.0))
            for token in history:  # the penalty counts the prompt's tokens too, as transformers' does
                api.llama_sampler_accept(self.pointer, token)
        if greedy:
            add(api.llama_sampler_init_greedy())
            return
        add(api.llama_sampler_init_temp(sampling.temperature))
        if sampling.top_p < 1.0:
            add(api.llama_sampler_init_top_p(sampling.top_p, 1))
        seed = DEFAULT_SEED if sampling.seed is None else sampling.seed % DEFAULT_SEED  # never the random one
        add(api.llama_sampler_init_dist(seed))

    def sample(self, context: KVContext, index: int) -> int:
        """The next token from the logits at batch index `index` of the context's last decode (and remember it)."""
        return _api().llama_sampler_sample(self.pointer, context.pointer, index)

    def close(self) -> None:
        if self.pointer:
            _api().llama_sampler_free(self.pointer)
            self.pointer = None


def installed() -> bool:
    """llama-cpp-python can be imported here (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


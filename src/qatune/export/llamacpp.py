"""llama.cpp itself, through llama-cpp-python's public API (`pip install 'qatune[llamacpp]'`):
its quantizer for the k-quants, and a GGUF file (with a LoRA adapter GGUF, if any) loaded the way
llama.cpp and Ollama load it, for the export's checks: greedy answers and perplexity.

Every check feeds llama.cpp the token ids qatune's tokenizer makes, so the weights are compared and
not the tokenizers; whether llama.cpp's own tokenizer agrees is checked beside it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from qatune.errors import GGUFExportError

EXTRA = "qatune[llamacpp]"
# llama.cpp's file types for the k-quants qatune offers (llama_cpp.LLAMA_FTYPE_MOSTLY_*).
K_QUANT_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                  "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require_llama_cpp(what: str) -> None:
    """A clear error naming the extra where llama-cpp-python is not installed."""
    if not llama_cpp_installed():
        raise GGUFExportError(f"{what} needs llama.cpp (the llama-cpp-python package), which is not installed",
                              hint=f"pip install '{EXTRA}' (it builds llama.cpp, a few minutes), or use --gguf "
                                   "f16, bf16 or q8_0, which qatune writes itself")


@contextlib.contextmanager
def _native_output_captured() -> Iterator[Path]:
    """The process's stdout and stderr into a file for the block: llama.cpp's quantizer prints a line
    per tensor from C, past Python's streams. Yields the file, to quote when it fails."""
    with tempfile.NamedTemporaryFile(prefix="qatune-llamacpp-", suffix=".log", delete=False) as log:
        path = Path(log.name)
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        path.unlink(missing_ok=True)


def quantize_gguf(source: Path, target: Path, qtype: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (llama-quantize) from an f16 GGUF `source` to `target` in `qtype`
    (q4_k_m, q5_k_m, q6_k). Tensors whose rows do not split into 256-wide k-blocks get the fallback
    type llama.cpp picks for them (q5_0, q8_0...), as its own tool does. threads 0: all cores."""
    require_llama_cpp(f"--gguf {qtype}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANT_FTYPES[qtype])
    params.nthread = threads
    with _native_output_captured() as log:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
        said = log.read_text(errors="replace").strip().splitlines()[-5:] if failed else []
    if failed:
        target.unlink(missing_ok=True)
        raise GGUFExportError(f"llama.cpp could not quantize {source.name} to {qtype} (code {failed}): "
                              + " / ".join(said))


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp, optionally with a LoRA adapter GGUF on it: greedy answers and
    per-token log-likelihoods, on token ids. A context manager: its memory is freed on exit."""

    def __init__(self, path: Path, n_ctx: int, lora: Path | None = None) -> None:
        require_llama_cpp("checking a GGUF file in llama.cpp")
        from llama_cpp import Llama

        from qatune.compat.llama_cpp import plain_cpu_buffers

        self.path = path
        # logits_all keeps every position's logits: perplexity reads them all, greedy the last.
        with plain_cpu_buffers():
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                             lora_path=str(lora) if lora else None, verbose=False)

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokens of `text` (control tokens as tokens, no bos added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, stops: set[int]) -> list[int]:
        """The greedy answer's ids after `prompt`, up to (not including) a stop id."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        answer: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if token in stops:
                break
            answer.append(token)
            self.llm.eval([token])
        return answer

    def logit_gap(self, ids: Sequence[int], token: int) -> float:
        """How far `token`'s logit lies below the top one after `ids`: near 0 where two answers part at a
        near tie (rounding, not a wrong weight), large where the weights differ."""
        self.llm.reset()
        self.llm.eval(list(ids))
        row = self.llm.scores[self.llm.n_tokens - 1]
        return float(row.max() - row[token])

    def negative_log_likelihood(self, input_ids: Sequence[int], labels: Sequence[int]) -> tuple[float, int]:
        """Summed -log p of each labelled token (label != -100, the training convention) given the ones
        before it, and how many there were."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(input_ids))
        targets = np.asarray(labels[1:])
        keep = np.nonzero(targets != -100)[0]
        if not len(keep):
            return 0.0, 0
        logits = np.asarray(self.llm.scores[keep], dtype=np.float64)  # position t predicts token t + 1
        top = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return float((log_norm - logits[np.arange(len(keep)), targets[keep]]).sum()), int(len(keep))


def perplexity(model: LlamaCppModel, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> float:
    """exp of the mean -log p over every labelled token of `rows` (input ids, labels)."""
    total, count = 0.0, 0
    for input_ids, labels in rows:
        nll, n = model.negative_log_likelihood(input_ids, labels)
        total, count = total + nll, count + n
    return math.exp(total / count) if count else float("nan")


def context_for(rows: Sequence[Sequence[int]], extra: int = 0) -> int:
    """A context long enough for the longest row plus `extra` tokens, rounded up to a multiple of 256."""
    longest = max((len(r) for r in rows), default=0) + extra
    return max(256, -(-longest // 256) * 256)


"""`serve.engine: llamacpp`: continuous batching on llama.cpp (llama-cpp-python), fast on a CPU.

Each served model is a lane: its GGUF file (`export.serving.gguf_for_serving`) and one llama.cpp context whose
key/value cache holds one sequence id per running request (`serve.llamacpp_context` cells each).
Every engine step advances all running sequences of a lane in one `llama_decode`: the last token
of each running request, plus the prompts of the requests admitted at this step (new requests
join between steps). A request that finishes or is cancelled gives its sequence's cells back at once.

The chat template's shared prefix (SmolLM's system prompt and header: 24 tokens) is computed
once per lane into sequence 0 and copied into each new sequence whose prompt starts with it,
so a request prefills only its own tokens. Each request samples with its own llama.cpp sampler
chain (repetition penalty, temperature, top-p, seed; greedy at temperature 0), and its text is
sent under the same stop rules as the hf engine's (`scheduling.append_token`).

A request is admitted when its lane has a free sequence id and the step has room for its prompt
(`llama_decode` takes up to serve.max_input_tokens + serve.max_batch_size tokens); otherwise it
waits, in order. Lanes of several models (base and each adapter merged into its own GGUF) are
stepped one after the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatune.errors import Problem
from qatune.serve.engine_plugin import AutoFit, EngineRequest, ModelUnfit
from qatune.serve.llamacpp_api import GGUFModel, KVContext, TokenSampler, installed
from qatune.serve.protocol import ServeError, template_prefix
from qatune.serve.scheduling import GREEDY_BELOW, BatchedEngine, BatchLoop, Request, append_token

if TYPE_CHECKING:
    from qatune.config import QatuneConfig
    from qatune.runtime import Runtime

PREFIX_SEQUENCE = 0  # the lane's shared prefix lives in sequence 0; requests get 1..max_batch_size
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class Lane:
    """One served model: its GGUF, a context, the template prefix, and the sequence ids no request holds."""

    model: GGUFModel
    context: KVContext
    prefix: list[int]
    free_ids: list[int]
    prefix_ready: bool = False

    def hit(self, request: Request) -> int:
        """How many of the request's prompt tokens the shared prefix already holds."""
        n = len(self.prefix)
        return n if n and len(request.prompt_ids) > n and request.prompt_ids[:n] == self.prefix else 0


@dataclass
class Sequence:
    """A running request's place in its lane."""

    lane: Lane
    sequence_id: int
    sampler: TokenSampler
    pending: list[int] = field(default_factory=list)  # tokens to decode at the next step
    position: int = 0  # position of the first pending token


class LlamaCppBatcher(BatchLoop):
    """The engine loop: `submit` from any thread; `start` runs it in its own thread."""

    def __init__(self, lanes: dict[str | None, Lane], tokenizer: Any, max_batch_size: int, max_queue: int,
                 on_step: Callable[[int, int, int], None] | None = None) -> None:
        super().__init__(max_batch_size, max_queue, on_step)
        self.lanes = lanes  # by adapter name (None: the base)
        self.tokenizer = tokenizer
        self._sequences: dict[int, Sequence] = {}  # by id(request)
        self._closed = False

    def _admit(self) -> list[Request]:
        """In order, while the batch, the lane's sequence ids and the step's tokens have room."""
        admitted: list[Request] = []
        taken: dict[int, int] = {}  # sequence ids per lane (by id) for the requests admitted here
        tokens = len(self._running)
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            request = self._waiting[0]
            if not request.cancelled.is_set():
                lane = self.lanes[request.adapter]
                own = len(request.prompt_ids) - lane.hit(request)
                if taken.get(id(lane), 0) >= len(lane.free_ids) or tokens + own > lane.context.batch_tokens:
                    break
                taken[id(lane)] = taken.get(id(lane), 0) + 1
                tokens += own
            admitted.append(self._waiting.popleft())
        return admitted

    def _step(self, admitted: list[Request]) -> int | None:
        cancelled = [r for r in self._running if r.cancelled.is_set()]
        self._leave(cancelled)  # free their cells before computing
        for request in cancelled:
            request.finish("cancelled")
        for request in admitted:
            self._begin(request)
        self._running += admitted
        if not self._running:
            return None
        by_lane: dict[int, list[Request]] = {}
        for request in self._running:
            by_lane.setdefault(id(self._sequences[id(request)].lane), []).append(request)
        finished: set[int] = set()
        for rows in by_lane.values():
            finished |= self._advance(rows)
        self._leave([r for r in self._running if id(r) in finished])
        return sum(len(rows) for rows in by_lane.values())

    def _begin(self, request: Request) -> None:
        """Give an admitted request a sequence id (sharing the prefix's cells when its prompt starts with it)."""
        lane = self.lanes[request.adapter]
        if lane.prefix and not lane.prefix_ready:
            lane.context.decode([(lane.prefix, PREFIX_SEQUENCE, 0)])
            lane.prefix_ready = True
        hit = lane.hit(request)
        sequence_id = lane.free_ids.pop()
        if hit:
            lane.context.copy_sequence(PREFIX_SEQUENCE, sequence_id)
        greedy = request.sampling.temperature < GREEDY_BELOW
        sampler = TokenSampler(lane.model, request.sampling, request.prompt_ids, greedy)
        self._sequences[id(request)] = Sequence(lane, sequence_id, sampler, request.prompt_ids[hit:], hit)

    def _advance(self, rows: list[Request]) -> set[int]:
        """One llama_decode for the rows of one lane, then a token for each; the ids of the rows that finished."""
        sequences = [self._sequences[id(r)] for r in rows]
        lane = sequences[0].lane
        outputs = lane.context.decode([(s.pending, s.sequence_id, s.position) for s in sequences])
        finished = set()
        for request, sequence, index in zip(rows, sequences, outputs):
            token = sequence.sampler.sample(lane.context, index)
            sequence.position += len(sequence.pending)
            sequence.pending = [token]
            if append_token(request, token, self.tokenizer):
                finished.add(id(request))
        return finished

    def _leave(self, requests: list[Request]) -> None:
        """Take requests off the running list, then give their sequences back: whoever sees a sequence id
        free sees its request no longer running."""
        leaving = {id(r) for r in requests}
        self._running = [r for r in self._running if id(r) not in leaving]
        for request in requests:
            sequence = self._sequences.pop(id(request))
            sequence.lane.context.drop_sequence(sequence.sequence_id)
            sequence.lane.free_ids.append(sequence.sequence_id)
            sequence.sampler.close()

    def _reset(self) -> None:
        """After a failed step the caches may hold half-written sequences: empty them (the prefix is recomputed)."""
        for sequence in self._sequences.values():
            sequence.sampler.close()
        self._sequences, self._running = {}, []
        for lane in self.lanes.values():
            lane.context.clear()
            lane.free_ids = list(range(self.max_batch_size, PREFIX_SEQUENCE, -1))
            lane.prefix_ready = False

    def stop(self) -> None:
        super().stop()
        if self._thread is None or not self._thread.is_alive():  # else it may still touch them: leave them be
            self._close()

    def _close(self) -> None:
        """Free every llama.cpp object, once."""
        if self._closed:
            return
        self._closed = True
        for sequence in self._sequences.values():
            sequence.sampler.close()
        for lane in self.lanes.values():
            lane.context.close()
            lane.model.close()


class LlamaCppEngine(BatchedEngine):
    """GGUF models on llama.cpp, decoded by a LlamaCppBatcher in its own thread."""

    kind = "llamacpp"


class LlamaCppPlugin:
    """The llamacpp engine as a plug-in: auto's first choice on a CPU where llama-cpp-python is installed."""

    name = LlamaCppEngine.kind

    def validate(self, config: "QatuneConfig") -> list[Problem]:
        size = config.serve.max_batch_size
        if size + 1 > MAX_SEQUENCES:  # and the shared prefix's sequence
            return [Problem("serve.max_batch_size", f"{size} is above what llama.cpp runs at once "
                                                    f"({MAX_SEQUENCES - 1} sequences)",
                            f"set serve.max_batch_size to {MAX_SEQUENCES - 1} or less")]
        return []

    def check_here(self, runtime: "Runtime") -> None:
        if not installed():
            raise ServeError("serve.engine llamacpp needs llama-cpp-python, which is not installed",
                             hint="pip install 'qatune[llamacpp]' (builds llama.cpp, a few minutes), "
                                  "or use serve.engine=hf")

    def auto_fit(self, device: str) -> AutoFit | None:
        if device != "cpu":  # it runs every layer on the CPU
            return None
        if installed():
            return AutoFit(0, True, "llama-cpp-python is installed")
        return AutoFit(0, False, "llama-cpp-python is not installed (pip install 'qatune[llamacpp]' answers "
                                 "several times faster here)")

    def load(self, request: EngineRequest) -> LlamaCppEngine:
        """A lane for each model of the request on its GGUF file (converted once where it is not one)."""
        serve_cfg = request.serve
        ggufs = _gguf_files(request)
        threads = serve_cfg.llamacpp_threads or default_threads()
        sequences = serve_cfg.max_batch_size + 1  # and the prefix's
        cells = serve_cfg.llamacpp_context or serve_cfg.max_input_tokens + serve_cfg.max_tokens
        batch_tokens = serve_cfg.max_input_tokens + serve_cfg.max_batch_size  # the longest prompt joins a full batch
        lanes: dict[str | None, Lane] = {}
        for served in request.models.values():
            model = GGUFModel(ggufs[served.name])
            lanes[served.name if served.adapter else None] = Lane(
                model, KVContext(model, cells, sequences, batch_tokens, threads),
                template_prefix(request.tokenizer, served),
                free_ids=list(range(serve_cfg.max_batch_size, PREFIX_SEQUENCE, -1)))
        batcher = LlamaCppBatcher(lanes, request.tokenizer, serve_cfg.max_batch_size, serve_cfg.max_queue,
                                  request.on_step)
        # Each request's prompt and answer fit its sequence: the app refuses more (400).
        max_positions = min(min(lane.model.n_ctx_train or lane.context.cells_per_sequence,
                                lane.context.cells_per_sequence) for lane in lanes.values())
        return LlamaCppEngine(batcher, request.models, request.default_model, max_positions)


def _gguf_files(request: EngineRequest) -> dict[str, Path]:
    """Each served model's GGUF file, by name (each adapter merged into a GGUF of its own); ModelUnfit where the
    GGUF writer cannot express the model."""
    from qatune.errors import GGUFExportError
    from qatune.export.serving import gguf_for_serving

    console, qtype = request.runtime.console, request.serve.llamacpp_gguf
    try:
        files = {name: gguf_for_serving(request.model, served.adapter, qtype, console)
                 for name, served in request.models.items()}
    except GGUFExportError as exc:
        raise ModelUnfit("llama.cpp cannot serve this model", exc.message,
                         f"{exc.hint}; or use serve.engine=hf" if exc.hint else "use serve.engine=hf") from None
    for name, path in files.items():
        console.print(f"  {name}: {path}", highlight=False, soft_wrap=True)
    return files


def default_threads() -> int:
    """llama-cpp-python's own default: half the CPUs this process may use (one per core where cores run two
    threads); on a busy machine more threads than free cores make llama.cpp's threads wait on each other
    (measured on 2 cores under a load average of 11: a 60-token prompt took 0.71 s on 1 thread, 7.2 s on 2)."""
    return max(1, len(os.sched_getaffinity(0)) // 2) if hasattr(os, "sched_getaffinity") else max(1, (os.cpu_count() or 2) // 2)


PLUGIN = LlamaCppPlugin()

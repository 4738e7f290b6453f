"""From a request to a running generation: what the request asks (`Ask`), the one seam that makes its prompt
tokens (`prompt_tokens`), its checked decoding, and its start on the engine, all under serve's limits."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from qatune.serve.api_errors import ApiError, server_busy
from qatune.serve.bodies import Decoding
from qatune.serve.protocol import EngineDown, Generation, QueueFull, Sampling, chat_prompt
from qatune.serve.service import Service


@dataclass(frozen=True)
class Ask:
    """What a request asks of a served model, before any template or tokenizer runs: a conversation rendered in
    the model's chat template, or (`text`, /v1/completions) a text continued as it is."""

    model: str
    param: str  # the request field that errors about the input name: messages | prompt | question
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None


async def start_generation(service: Service, ask: Ask, decoding: Decoding) -> Generation:
    """Admit the request, make its prompt, check its decoding and hand it to the engine (4xx/503 ApiError else)."""
    _check_size(service, ask)
    with service.admission:  # until the engine has it, then the engine counts it
        prompt = await prompt_tokens(service, ask)
        return _start(service, prompt, _sampling(service, decoding, len(prompt)), ask.model)


async def prompt_tokens(service: Service, ask: Ask) -> list[int]:
    """The prompt's tokens: every route's prompt is made here, in a worker thread (never on the event loop)."""
    from qatune.infer.generation import ForgedTurnError

    engine = service.engine
    if ask.text is not None:
        tokens = await asyncio.to_thread(engine.tokenizer.encode, ask.text)
        if not tokens:
            raise ApiError(400, "prompt is empty: give some text to continue", param=ask.param)
        return tokens
    try:
        return await asyncio.to_thread(chat_prompt, engine, ask.model, list(ask.messages))
    except ForgedTurnError as exc:
        raise ApiError(400, f"{exc.message}; fix: {exc.hint}", param=ask.param, code="control_token") from None
    except Exception as exc:  # the template refuses this conversation (roles out of order, ...)
        raise ApiError(400, f"the chat template of {ask.model!r} cannot render these messages: {str(exc)[:300]}",
                       param=ask.param) from None


def _check_size(service: Service, ask: Ask) -> None:
    """The cheap bounds, before any template or tokenizer runs: message count and characters."""
    cfg, param = service.cfg, ask.param
    texts = [m["content"] for m in ask.messages] if ask.text is None else [ask.text]
    if len(texts) > cfg.max_messages:
        raise ApiError(413, f"{len(texts)} messages; this server accepts at most {cfg.max_messages} "
                            "(serve.max_messages)", param=param, code="context_length_exceeded")
    chars = sum(len(text) for text in texts)
    if chars > cfg.max_input_chars:
        raise ApiError(413, f"the {param} hold {chars} characters; this server accepts at most "
                            f"{cfg.max_input_chars} (serve.max_input_chars): send a shorter text",
                       param=param, code="context_length_exceeded")


def _sampling(service: Service, body: Decoding, prompt_tokens: int) -> Sampling:
    """Checked decoding settings: limits give 413 (prompt) and 400 (everything else)."""
    cfg, engine = service.cfg, service.engine
    if prompt_tokens > cfg.max_input_tokens:
        raise ApiError(413, f"the prompt has {prompt_tokens} tokens; this server accepts at most "
                            f"{cfg.max_input_tokens} (serve.max_input_tokens)", param="messages",
                       code="context_length_exceeded")
    requested = body.max_completion_tokens or body.max_tokens
    if requested is not None and requested > cfg.max_tokens:
        raise ApiError(400, f"max_tokens={requested} is above this server's limit of {cfg.max_tokens} "
                            "(serve.max_tokens)", param="max_tokens")
    defaults = cfg.decoding
    max_new = requested or min(defaults.max_new_tokens, cfg.max_tokens)
    if engine.max_positions and prompt_tokens + max_new > engine.max_positions:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new}) exceeds the model's "
                            f"context of {engine.max_positions} tokens", param="max_tokens",
                       code="context_length_exceeded")
    if body.frequency_penalty or body.presence_penalty:
        raise ApiError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty "
                            "(1.0-2.0, above 1 discourages repeats)", param="frequency_penalty")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    if any(len(s) > cfg.max_stop_chars for s in stops):
        raise ApiError(400, f"a stop string is longer than this server's limit of {cfg.max_stop_chars} characters "
                            "(serve.max_stop_chars)", param="stop")
    return Sampling(
        max_new_tokens=max_new,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        repetition_penalty=defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
        stop=tuple(stops), seed=body.seed,
    )


def _start(service: Service, prompt: list[int], sampling: Sampling, model: str) -> Generation:
    engine, metrics = service.engine, service.metrics
    try:
        generation = engine.generate(prompt, sampling, model)
    except QueueFull as exc:
        raise server_busy(str(exc)) from None
    except EngineDown as exc:
        raise ApiError(503, f"the server cannot answer: {exc}; it needs a restart (/health says 503)",
                       "server_error", code="engine_down") from None
    metrics.queue.set(engine.queue_depth)
    metrics.prompt.inc(len(prompt))
    return generation

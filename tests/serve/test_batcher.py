"""The continuous batcher on its own: rows joining and leaving a running batch compute exactly what
each request computes alone; stop strings; queue bound; cancellation."""

from __future__ import annotations

import threading

import pytest
import torch

from qatune.serve.batcher import ContinuousBatcher
from qatune.serve.protocol import QueueFull, Sampling
from qatune.serve.scheduling import Request, held_back


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def alone(model, prompt: list[int], tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run(batcher: ContinuousBatcher, requests: list[Request], done: list[threading.Event]) -> None:
    batcher.start()
    try:
        assert all(event.wait(60) for event in done)
    finally:
        batcher.stop()


def make(prompt, sampling, done: threading.Event, updates: list | None = None, stop_ids=()) -> Request:
    def on_update(update):
        if updates is not None:
            updates.append(update)
        if update.finish_reason:
            done.set()
    return Request(prompt, sampling, tuple(stop_ids), on_update)


def test_rows_joining_and_leaving_match_each_request_alone(tiny):
    model, tok = tiny
    texts = ["hello", "什么是高血压？请详细说明一下", "one two three four five six seven eight", "a b"]
    lengths = [3, 9, 5, 7, 2, 8, 6, 4]  # rows finish at different steps; batch of 3 so rows wait and join late
    prompts = [tok.encode(texts[i % len(texts)]) for i in range(len(lengths))]
    expected = [alone(model, p, n) for p, n in zip(prompts, lengths)]
    done = [threading.Event() for _ in prompts]
    requests = [make(p, Sampling(n), d) for p, n, d in zip(prompts, lengths, done)]
    batcher = ContinuousBatcher(model, tok, max_batch_size=3, pad_id=0)
    for r in requests:
        batcher.submit(r)
    run(batcher, requests, done)
    assert [r.generated for r in requests] == expected


def test_prefix_cache_gives_the_same_tokens(tiny):
    """Prompts that start with the cached prefix are prefilled from after it; others run whole."""
    model, tok = tiny
    prefix = tok.encode("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n<|im_start|>user\n")
    own = ["hello", "什么是高血压？", "one two three four five", "a"]
    prompts = [prefix + tok.encode(t) for t in own] + [tok.encode("no prefix here"), prefix]
    expected = [alone(model, p, 6) for p in prompts]
    done = [threading.Event() for _ in prompts]
    requests = [make(p, Sampling(6), d) for p, d in zip(prompts, done)]
    batcher = ContinuousBatcher(model, tok, max_batch_size=4, pad_id=0, prefixes={None: prefix})
    for r in requests:
        batcher.submit(r)
    run(batcher, requests, done)
    assert [r.generated for r in requests] == expected
    assert list(batcher._prefix_cache) == [None]  # computed once, then reused
    assert [bool(batcher._prefix_of(r)) for r in requests] == [True] * 4 + [False, False]


def test_stop_token_and_stop_string(tiny):
    model, tok = tiny
    prompt = tok.encode("one two three")
    free = alone(model, prompt, 10)
    done = [threading.Event(), threading.Event()]
    by_token = make(prompt, Sampling(10), done[0], stop_ids=[free[3]])
    text = tok.decode(free)
    stop = text[len(tok.decode(free[:2])):][:3]
    updates: list = []
    by_string = make(prompt, Sampling(10, stop=(stop,)), done[1], updates)
    batcher = ContinuousBatcher(model, tok, pad_id=0)
    batcher.submit(by_token)
    batcher.submit(by_string)
    run(batcher, [by_token, by_string], done)
    assert by_token.generated == free[:free.index(free[3]) + 1]
    sent = "".join(u.text for u in updates)
    assert updates[-1].finish_reason == "stop" and sent == text[:text.index(stop)]
    assert stop not in sent


def test_held_back_text():
    assert held_back("the answer is###", ("####",)) == 3
    assert held_back("the answer", ("####",)) == 0
    assert held_back("高血\ufffd", ()) == 1


def test_queue_bound_and_cancel_before_start(tiny):
    model, tok = tiny
    batcher = ContinuousBatcher(model, tok, max_queue=2, pad_id=0)
    done = [threading.Event() for _ in range(3)]
    updates: list = []
    first = make([1, 2, 3], Sampling(4), done[0], updates)
    batcher.submit(first)
    batcher.submit(make([1, 2, 3], Sampling(4), done[1]))
    with pytest.raises(QueueFull):
        batcher.submit(make([1, 2, 3], Sampling(4), done[2]))
    first.cancel()  # a cancelled waiting request frees its place
    batcher.submit(make([1, 2, 3], Sampling(4), done[2]))
    batcher.start()
    try:
        assert done[1].wait(30) and done[2].wait(30)
    finally:
        batcher.stop()
    assert first.generated == []


def test_a_tiny_temperature_is_greedy(tiny):
    """1e-114 would overflow the division by the temperature; it means greedy, as 0 does."""
    model, tok = tiny
    prompt = tok.encode("one two three")
    done = [threading.Event(), threading.Event()]
    requests = [make(prompt, Sampling(6, temperature=t), d) for t, d in zip((8.4e-114, 1e-300), done)]
    batcher = ContinuousBatcher(model, tok, pad_id=0)
    for r in requests:
        batcher.submit(r)
    run(batcher, requests, done)
    assert [r.generated for r in requests] == [alone(model, prompt, 6)] * 2

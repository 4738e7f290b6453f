"""The continuous batcher on a tiny random Gemma 3 (three sliding-window layers of 16 tokens, one global): prompts
plus answers run past the window, so a row whose padding, merge, removal or cached prefix shifted its window
would answer differently from the same request alone. Batched == one at a time == `model.generate`, which
keeps a true sliding cache per layer."""

from __future__ import annotations

import threading

import pytest
import torch

from qatune.serve.batcher import ContinuousBatcher
from qatune.serve.protocol import Sampling
from qatune.serve.scheduling import Request
from tests.conftest import TINY_GEMMA_WINDOW


@pytest.fixture(scope="module")
def gemma(tiny_gemma_dir, gemma_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32).eval()
    return model, gemma_tokenizer


def generated_alone(model, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens of `generate`, whose cache for Gemma 3 keeps only the window in each sliding layer."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def batched(model, tok, prompts: list[list[int]], lengths: list[int], max_batch_size: int,
            prefixes: dict | None = None) -> tuple[list[list[int]], ContinuousBatcher]:
    """Every request's greedy tokens from one batcher, all submitted at once."""
    done = [threading.Event() for _ in prompts]

    def finisher(event: threading.Event):
        return lambda update: event.set() if update.finish_reason else None

    requests = [Request(p, Sampling(n), (), finisher(d)) for p, n, d in zip(prompts, lengths, done)]
    batcher = ContinuousBatcher(model, tok, max_batch_size=max_batch_size, pad_id=0, prefixes=prefixes)
    for r in requests:
        batcher.submit(r)
    batcher.start()
    try:
        assert all(event.wait(120) for event in done)
    finally:
        batcher.stop()
    return [r.generated for r in requests], batcher


TEXTS = ["hello", "什么是高血压？请详细说明一下它的症状、原因和治疗方法，以及日常生活中需要注意什么",
         "one two three four five six seven eight nine ten eleven twelve thirteen", "a b",
         "年假可以跨年使用吗？公司规定是怎样的呢"]


def test_rows_joining_and_leaving_match_each_request_alone_past_the_window(gemma):
    model, tok = gemma
    lengths = [20, 6, 24, 11, 3, 18, 9]  # rows finish at different steps; batch of 3 so rows wait and join late
    prompts = [tok.encode(TEXTS[i % len(TEXTS)]) for i in range(len(lengths))]
    assert max(len(p) + n for p, n in zip(prompts, lengths)) > 2 * TINY_GEMMA_WINDOW
    assert min(len(p) for p in prompts) < TINY_GEMMA_WINDOW < max(len(p) for p in prompts)
    expected = [generated_alone(model, p, n) for p, n in zip(prompts, lengths)]
    one_at_a_time, _ = batched(model, tok, prompts, lengths, max_batch_size=1)
    together, _ = batched(model, tok, prompts, lengths, max_batch_size=3)
    assert one_at_a_time == expected
    assert together == expected


def test_prefix_cache_keeps_each_rows_window(gemma):
    """Rows prefilled from after a cached prefix, with own parts of different lengths: the prefix sits at the same
    distance from each row's tokens as it does alone, so it leaves each sliding window at the same step."""
    model, tok = gemma
    prefix = tok.encode("<start_of_turn>user\nYou are a careful assistant. Answer briefly.\n")
    own = ["hi", "什么是高血压？请详细说明一下", "one two three four five six seven eight nine ten eleven twelve thirteen "
           "fourteen fifteen sixteen seventeen eighteen", "a", "年假可以跨年使用吗"]
    prompts = [prefix + tok.encode(t, add_special_tokens=False) for t in own] + [tok.encode("no prefix"), prefix]
    lengths = [14, 10, 16, 12, 8, 10, 12]
    own_lengths = [len(p) - len(prefix) for p in prompts[:len(own)]]
    assert len(prefix) < TINY_GEMMA_WINDOW < len(prefix) + min(lengths)
    assert max(own_lengths) - min(own_lengths) > len(prefix)  # one row's padding reaches past its whole prefix
    expected = [generated_alone(model, p, n) for p, n in zip(prompts, lengths)]
    together, batcher = batched(model, tok, prompts, lengths, max_batch_size=4, prefixes={None: prefix})
    assert together == expected
    assert list(batcher._prefix_cache) == [None]
    assert [bool(batcher._prefix_of(Request(p, Sampling(1), (), print))) for p in prompts] == [True] * 5 + [False] * 2


def test_served_over_http_in_gemmas_template_and_stopping_at_end_of_turn(start_server, tiny_gemma_dir):
    """`qatune serve` (hf engine) on the tiny Gemma: the prompt is Gemma's turn template, and the answer ends where
    the model picks <end_of_turn> (here after four tokens), with "stop", not at the token limit, and equals the
    model's own first four greedy tokens."""
    import httpx

    from qatune.infer.generation import prompt_ids
    from tests.serve.conftest import serve_config
    from tests.test_gemma_road import ending_its_turn_at

    server = start_server(serve_config(tiny_gemma_dir, None, "serve.max_batch_size=2"))
    model, tok = server.engine.batcher.model, server.engine.tokenizer
    served = next(iter(server.engine.models.values()))
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in served.stop_ids and tok.eos_token_id != end_of_turn
    question = "什么是高血压？"
    prompt = prompt_ids(tok, served.template.source, [{"role": "user", "content": question}])
    assert tok.decode(prompt) == f"<bos><start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"
    body = {"model": served.name, "messages": [{"role": "user", "content": question}], "max_tokens": 20,
            "temperature": 0}
    with ending_its_turn_at(model, len(prompt) + 4, end_of_turn):
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and reply["usage"]["prompt_tokens"] == len(prompt)
    assert reply["usage"]["completion_tokens"] == 5  # four tokens and <end_of_turn>
    first_four = generated_alone(model, prompt, 4)
    assert choice["message"]["content"] == tok.decode(first_four, skip_special_tokens=True)
    assert "<end_of_turn>" not in choice["message"]["content"]

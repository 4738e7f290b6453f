"""The llamacpp engine on Gemma 3: a tiny Gemma 3 Hugging Face folder, converted to GGUF by qatune's writer, answers
over HTTP token for token as the hf engine does, in Gemma's turn template, stopping at <end_of_turn>; the embedded
gemma-3-270m is served from its shipped GGUF with Gemma's turn prompt and <end_of_turn> as its stop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.serve.conftest import LLAMACPP, serve_config

pytest.importorskip("llama_cpp", reason="the llamacpp engine needs llama-cpp-python")

# Long enough that prompt and answer run past the sliding window of 16 tokens.
STOPPING = "What should I do when I have a fever, and when should I see a doctor about it? Please answer briefly."
RUNNING = "感冒了应该多喝水吗？还需要注意什么？请详细说明一下它的症状和原因"
STOP_AT = 4  # the stopping question's answer ends with <end_of_turn> after this many tokens (or sooner)


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, gemma_tokenizer) -> Path:
    """A tiny random Gemma 3 (5 sliding layers of 16 tokens, 1 global) whose answers are decided and end a turn.
    An output matrix of its own: 64 tokens' rows are scaled up, so each step's top token leads clearly (of
    262,144 random logits the first two are often within f16's rounding); and <end_of_turn> takes the row of
    the stopping question's token at STOP_AT, so that answer ends there, as a tuned model's does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from qatune.infer.generation import prompt_ids

    tok = gemma_tokenizer
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    favoured = sorted(set(tok.encode(" the a of and to in is you that it was for on are as with they at be this have "
                                     "from 我 你 是 的 了 在 有 和", add_special_tokens=False)))[:64]
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    head = model.lm_head.weight
    with torch.no_grad():
        head[favoured] *= 8
        prompt = prompt_ids(tok, tok.chat_template, _messages(STOPPING))
        answer = model.generate(torch.tensor([prompt]), max_new_tokens=STOP_AT + 1, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        chosen = answer[STOP_AT]
        head[[chosen, end_of_turn]] = head[[end_of_turn, chosen]]
    folder = tmp_path_factory.mktemp("gemma-served")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _ask(server, question: str, max_tokens: int = 12) -> dict:
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": server.engine.default_model, "messages": _messages(question), "max_tokens": max_tokens,
        "temperature": 0})
    response.raise_for_status()
    return response.json()


@pytest.mark.slow
def test_tiny_gemma_on_llamacpp_answers_over_http_as_the_hf_engine(start_server, gemma_dir, gguf_cache):
    """Both engines over real HTTP: the same text, token count and finish reason; one answer ends its turn, the
    other runs to max_tokens past the window."""
    from gguf import GGUFReader

    hf = start_server(serve_config(gemma_dir, None))
    llamacpp = start_server(serve_config(gemma_dir, None, *LLAMACPP, "serve.llamacpp_gguf=f16"))
    assert llamacpp.engine.kind == "llamacpp" and hf.engine.kind == "hf"
    gguf = llamacpp.engine.batcher.lanes[None].model.path
    assert gguf.parent == gguf_cache and GGUFReader(gguf).fields["general.architecture"].contents() == "gemma3"
    answers = {}
    for question in (STOPPING, RUNNING):
        answers[question] = [_ask(server, question) for server in (hf, llamacpp)]
        by_hf, by_llamacpp = answers[question]
        keys = lambda a: (a["choices"][0]["message"]["content"], a["choices"][0]["finish_reason"],  # noqa: E731
                          a["usage"]["completion_tokens"])
        assert keys(by_llamacpp) == keys(by_hf)
    stopped = answers[STOPPING][1]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert 0 < stopped["usage"]["completion_tokens"] <= STOP_AT
    text = stopped["choices"][0]["message"]["content"]
    assert text.strip() and "<end_of_turn>" not in text and "<start_of_turn>" not in text
    running = answers[RUNNING][1]
    assert running["choices"][0]["finish_reason"] == "length" and running["usage"]["completion_tokens"] == 12
    # Side by side in one batch, sharing the template's prefix in the cache: each as it answered alone.
    questions = [STOPPING, RUNNING] * 2
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda q: _ask(llamacpp, q), questions))
    assert [a["choices"][0]["message"]["content"] for a in together] == \
        [answers[q][1]["choices"][0]["message"]["content"] for q in questions]


def test_the_embedded_gemma_is_served_from_its_gguf_in_gemmas_turn_template():
    """gemma-3-270m on llamacpp: its shipped GGUF (no chat template inside) serves prompts qatune renders in Gemma's
    turn template, <end_of_turn> stops an answer, and the engine answers as llama.cpp does alone on that file."""
    from qatune.models import GEMMA_MODEL, gemma_gguf_path
    from qatune.serve.protocol import Sampling, chat_prompt
    from tests.serve.test_llamacpp import alone, engine_of, reference, submit_all

    engine = engine_of(serve_config(Path(GEMMA_MODEL), None, *LLAMACPP)).engine
    lane = engine.batcher.lanes[None]
    assert lane.model.path == gemma_gguf_path()
    tok = engine.tokenizer
    served = engine.models[engine.default_model]
    prompt = chat_prompt(engine, served.name, _messages("What is the capital of France?"))
    assert tok.decode(prompt) == ("<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
                                  "<start_of_turn>model\n")
    assert tok.convert_tokens_to_ids("<end_of_turn>") in served.stop_ids
    engine.start()
    try:
        request = submit_all(engine, [prompt], [Sampling(10)])[0]
    finally:
        engine.stop()
    assert request.generated == alone(reference(lane.model.path), prompt, 10, served.stop_ids)

"""The llamacpp engine: concurrent greedy answers equal llama.cpp's own one-at-a-time answers token for
token; requests join between steps and cancelled ones free their sequence; per-request sampling;
`serve.engine: auto`; several models (Hugging Face folder and adapters, converted to GGUF once);
and `qatune serve --engine llamacpp` with the official openai client."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qatune.compat.llama_cpp import plain_cpu_buffers
from qatune.serve.protocol import Sampling
from qatune.serve.scheduling import Request
from tests.serve.conftest import free_port, llamacpp_config, serve_config

llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp engine needs llama-cpp-python")

WORDS = ["a fever", "a cold", "hypertension", "diabetes", "a headache", "back pain", "insomnia", "allergies",
         "asthma", "the flu", "a cough", "acne"]


def runtime():
    from qatune.runtime import Runtime

    return Runtime(device="cpu")


def engine_of(config):
    from qatune.serve import recipe

    return recipe.setup(recipe.plan(config, runtime()))


def reference(gguf: Path):
    """llama.cpp's own high-level API on the same file: one sequence at a time."""
    with plain_cpu_buffers():  # as the engine loads it
        return llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=1, n_threads_batch=1, flash_attn=True,
                               verbose=False)


def alone(llm, prompt: list[int], max_new: int, stop_ids: tuple[int, ...]) -> list[int]:
    """llama.cpp's greedy answer to `prompt`, up to and with the first stop token."""
    llm.reset()
    tokens: list[int] = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if token in stop_ids or len(tokens) == max_new:
            return tokens
    return tokens


def submit_all(engine, prompts: list[list[int]], samplings: list[Sampling],
               models: list[str] | None = None) -> list[Request]:
    """Submit every request at once (on the base, or each on its model of `models`) and wait until each finished."""
    done = [threading.Event() for _ in prompts]
    finish: list[str | None] = [None] * len(prompts)

    def on_update(i):
        def update(u):
            if u.finish_reason:
                finish[i] = u.finish_reason
                done[i].set()
        return update

    requests = []
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        served = engine.models[models[i] if models else next(iter(engine.models))]
        requests.append(Request(prompt, sampling, served.stop_ids, on_update(i),
                                adapter=served.name if served.adapter else None))
    for r in requests:
        engine.batcher.submit(r)
    assert all(event.wait(120) for event in done)
    assert all(reason in ("stop", "length") for reason in finish), finish
    return requests


def chat_ids(engine, question: str, model: str | None = None) -> list[int]:
    from qatune.serve.protocol import chat_prompt

    return chat_prompt(engine, model or next(iter(engine.models)), [{"role": "user", "content": question}])


def test_twelve_concurrent_greedy_answers_equal_llama_cpp_one_at_a_time():
    """12 requests of different lengths on 5 sequences: they join between steps as others finish, share
    each decode, and answer exactly what llama.cpp answers to each alone."""
    components = engine_of(llamacpp_config("serve.max_batch_size=5"))
    engine = components.engine
    prompts = [chat_ids(engine, f"What should I do about {w}?") for w in WORDS]
    lengths = [8 + (7 * i) % 25 for i in range(len(prompts))]
    engine.start()
    try:
        requests = submit_all(engine, prompts, [Sampling(n) for n in lengths])
    finally:
        engine.stop()
    lane = engine.batcher.lanes[None]
    llm = reference(lane.model.path)
    stops = engine.models[engine.default_model].stop_ids
    assert [r.generated for r in requests] == [alone(llm, p, n, stops) for p, n in zip(prompts, lengths)]
    tokens = sum(len(r.generated) for r in requests)
    steps = components.metrics.steps._value.get()
    assert steps < tokens / 3, f"{tokens} tokens in {steps:.0f} steps: the requests were not batched"
    assert lane.prefix_ready and sorted(lane.free_ids) == [1, 2, 3, 4, 5]  # every sequence given back


def test_a_cancelled_request_gives_its_sequence_back_at_once():
    engine = engine_of(llamacpp_config("serve.max_batch_size=2")).engine
    lane = engine.batcher.lanes[None]
    prompt = chat_ids(engine, "Tell me everything about the history of medicine.")
    first_piece, finished = threading.Event(), threading.Event()
    reasons = []

    def on_update(update):
        if update.text:
            first_piece.set()
        if update.finish_reason:
            reasons.append(update.finish_reason)
            finished.set()

    request = Request(prompt, Sampling(280), (), on_update)
    engine.start()
    try:
        engine.batcher.submit(request)
        assert first_piece.wait(60)
        request.cancel()
        assert finished.wait(10)
        assert reasons == ["cancelled"] and len(request.generated) < 200
        deadline = time.time() + 5
        while len(lane.free_ids) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert sorted(lane.free_ids) == [1, 2] and engine.batcher.running == 0
        again = submit_all(engine, [prompt], [Sampling(4)])  # the freed sequence serves the next request
        assert len(again[0].generated) == 4
    finally:
        engine.stop()


def test_sampling_is_per_request_and_seeded():
    engine = engine_of(llamacpp_config()).engine
    prompt = chat_ids(engine, "Write a short poem about the sea.")
    hot = dict(max_new_tokens=16, temperature=1.2, top_p=0.95)
    engine.start()
    try:
        runs = submit_all(engine, [prompt] * 4, [Sampling(**hot, seed=7), Sampling(**hot, seed=7),
                                                 Sampling(**hot, seed=8), Sampling(16)])
        penalized = submit_all(engine, [prompt], [Sampling(16, repetition_penalty=1.8)])[0]
    finally:
        engine.stop()
    seeded, same_seed, other_seed, greedy = (r.generated for r in runs)
    assert seeded == same_seed  # side by side in one batch, each with its own sampler
    assert seeded != other_seed and seeded != greedy
    assert penalized.generated != greedy


def test_auto_picks_llamacpp_on_a_cpu_hf_without_it_and_says_why(monkeypatch):
    import importlib.util
    from dataclasses import replace

    from qatune.serve.recipe import plan

    config = llamacpp_config("serve.engine=auto")
    cpu = runtime()
    planned = plan(config, cpu)
    assert (planned.engine, planned.engine_reason) == ("llamacpp", "serve.engine auto: a CPU, and llama-cpp-python "
                                                                   "is installed")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llama_cpp", "vllm")
                        else find_spec(name, *a))
    planned = plan(config, cpu)
    assert planned.engine == "hf" and "pip install 'qatune[llamacpp]'" in planned.engine_reason
    assert plan(config, replace(cpu, device="cuda")).engine == "hf"  # a GPU without vLLM
    from qatune.serve.protocol import ServeError

    with pytest.raises(ServeError, match=r"qatune\[llamacpp\]"):
        plan(llamacpp_config(), cpu)


def test_serve_engine_auto_is_the_default():
    from qatune.config import load_config

    assert load_config(None, []).serve.engine == "auto"


@pytest.mark.slow
def test_a_hugging_face_model_and_its_adapters_are_served_each_on_its_own_gguf(gguf_cache, tiny_model_dir,
                                                                              lora_adapters, capsys):
    """The tiny Hugging Face model and the adapters alpha and beta merged into it: three GGUF files written
    once, three lanes; concurrent requests on all three equal llama.cpp's answers on each file alone."""
    config = serve_config(tiny_model_dir, lora_adapters, "serve.engine=llamacpp", "serve.llamacpp_threads=1",
                          "serve.max_tokens=64")
    engine = engine_of(config).engine
    assert capsys.readouterr().out.count("Converting") == 3
    names = list(engine.models)
    files = {name: engine.batcher.lanes[None if i == 0 else name].model.path for i, name in enumerate(names)}
    assert len(set(files.values())) == 3 and all(p.parent == gguf_cache for p in files.values())
    questions = ["What is a fever?", "感冒了应该注意什么？"]
    jobs = [(name, q) for name in names for q in questions]
    engine.start()
    try:
        requests = submit_all(engine, [chat_ids(engine, q, name) for name, q in jobs], [Sampling(10)] * len(jobs),
                              [name for name, _ in jobs])
    finally:
        engine.stop()
    for name in names:
        llm = reference(files[name])
        for request, (model, q) in zip(requests, jobs):
            if model == name:
                assert request.generated == alone(llm, request.prompt_ids, 10, engine.models[name].stop_ids), name
    by_model = {name: tuple(tuple(r.generated) for r, (m, _) in zip(requests, jobs) if m == name) for name in names}
    assert len(set(by_model.values())) == 3  # each adapter answers its own way

    again = engine_of(config).engine  # cached: nothing is converted again
    assert "Converting" not in capsys.readouterr().out
    again.stop()


def test_an_export_folder_serves_its_gguf_by_preference(tmp_path):
    from qatune.export.serving import export_gguf

    assert export_gguf(tmp_path) is None
    for name in ("model-f16.gguf", "model-q4_k_m.gguf", "model-q8_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    assert export_gguf(tmp_path).name == "model-q8_0.gguf"
    (tmp_path / "model-q8_0.gguf").unlink()
    assert export_gguf(tmp_path).name == "model-q4_k_m.gguf"


def test_default_is_served_from_its_conversion_not_the_shipped_q4_1_file():
    """The embedded model's package folder holds its Q4_1 GGUF: it is not an export folder, or the engine would
    serve that file (half q8_0's speed in batches)."""
    import gguf
    from rich.console import Console

    from qatune.config import ModelConfig
    from qatune.export.serving import gguf_for_serving

    path = gguf_for_serving(ModelConfig(name_or_path="default"), None, "q8_0", Console(quiet=True))
    file_type = gguf.GGUFReader(path).get_field("general.file_type")
    assert path.name.endswith("-q8_0.gguf")
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q8_0


def test_an_adapter_only_export_is_not_served_as_the_tuned_model(tmp_path):
    """`export --gguf-adapter` leaves adapter.gguf and the unmerged base-f16.gguf: neither is the tuned model."""
    from qatune.export.serving import export_gguf

    for name in ("adapter.gguf", "base-f16.gguf"):
        (tmp_path / name).write_bytes(b"")
    assert export_gguf(tmp_path) is None
    (tmp_path / "model-q8_0.gguf").write_bytes(b"")
    assert export_gguf(tmp_path).name == "model-q8_0.gguf"


def test_a_model_llama_cpp_cannot_take_is_served_by_hf_under_auto(tmp_path, tokenizer, gguf_cache, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from qatune.serve.protocol import ServeError

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    auto = engine_of(serve_config(folder, None, "serve.engine=auto"))
    assert auto.engine.kind == "hf"
    assert "Engine hf instead: llama.cpp cannot serve this model" in capsys.readouterr().out
    with pytest.raises(ServeError, match="llama.cpp cannot serve this model"):
        engine_of(serve_config(folder, None, "serve.engine=llamacpp"))


@pytest.mark.slow
def test_qatune_serve_engine_llamacpp_answers_the_openai_client(tmp_path):
    """The command itself, in its own process, over real HTTP: plain and streamed answers agree."""
    import httpx
    import openai

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "qatune", "serve", "--engine", "llamacpp", "--model",
                                    "default", "--port", str(port), "serve.llamacpp_threads=1",
                                    "serve.max_tokens=64", "serve.max_input_tokens=512"],
                                   stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"NO_COLOR": "1"})
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["engine"] == "llamacpp":
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, log.read_text()
            time.sleep(0.5)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        question = [{"role": "user", "content": "What should I do when I have a fever?"}]
        plain = api.chat.completions.create(model="default", messages=question, max_tokens=24, temperature=0)
        assert plain.choices[0].message.content and plain.usage.completion_tokens <= 24
        chunks = list(api.chat.completions.create(model="default", messages=question, max_tokens=24, temperature=0,
                                                  stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2 and "".join(pieces) == plain.choices[0].message.content
        assert "Engine llamacpp (serve.engine llamacpp)" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)

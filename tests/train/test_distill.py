"""Distillation: the chunked loss equals a direct full-logits computation (value and gradients, each
divergence); distilling lowers the divergence to the teacher faster than cross-entropy alone; a student cut
from the default model saves, exports and answers; mismatched tokenizers and unfit settings stop with named
errors."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from qatune.config import DistillConfig, ModelConfig
from qatune.data.templates import IGNORE_INDEX
from qatune.errors import ConfigError
from qatune.models import load_model
from qatune.train.distill import DistillError, distillation_chunks, held_out_divergence, tokenizer_difference
from qatune.train.loss import chunked_linear_loss, labelled_positions, mean_over_items
from qatune.train.run import train
from qatune.train.stages.distill import angular_block_indices, keep_decoder_layers, kept_layer_indices
from tests.conftest import tiny_config

VOCAB = 40


def reference_loss(student_logits, teacher_logits, labels, cfg: DistillConfig) -> torch.Tensor:
    """alpha * T^2 * D + (1 - alpha) * CE per answer token, from whole logits, with torch's own KL."""
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    s, t, targets = s[keep], t[keep], targets[keep]
    T = cfg.temperature
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if cfg.divergence == "forward_kl":
        div = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    elif cfg.divergence == "reverse_kl":
        div = F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    else:
        p, q = log_p.exp(), log_q.exp()
        m = (p + q) / 2
        div = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    ce = F.cross_entropy(s, targets, reduction="sum")
    return (cfg.alpha * T * T * div + (1 - cfg.alpha) * ce) / keep.sum()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_chunked_loss_equals_the_full_logits_computation(divergence, alpha) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, requires_grad=True)
    teacher_hidden = torch.randn(2, 9, 24, generator=gen)  # a wider teacher: only the vocabulary is shared
    teacher_weight = torch.randn(VOCAB, 24, generator=gen)
    labels = torch.randint(0, VOCAB, (2, 9), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    cfg = DistillConfig(alpha=alpha, temperature=2.0, divergence=divergence, student_layers=1)

    expected = reference_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels, cfg)
    expected.backward()
    want_hidden, want_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    rows, targets = labelled_positions(hidden, labels)
    teacher_rows, _ = labelled_positions(teacher_hidden, labels)
    chunks = distillation_chunks(targets, teacher_rows, teacher_weight, cfg, torch.float32)
    got = mean_over_items(chunked_linear_loss(rows, weight, chunks, 3, torch.float32), targets.numel(), None)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, want_hidden)
    torch.testing.assert_close(weight.grad, want_weight)


def test_evenly_spaced_layers_keep_the_first_and_the_last() -> None:
    assert kept_layer_indices(30, 4) == [0, 10, 19, 29]
    assert kept_layer_indices(30, 15) == sorted(set(kept_layer_indices(30, 15)))
    assert len(kept_layer_indices(30, 20)) == 20 and kept_layer_indices(30, 20)[-1] == 29
    assert kept_layer_indices(4, 4) == [0, 1, 2, 3]


def identity_layers(model, *indices: int):
    """`model` with the decoder layers at `indices` passing the residual stream through unchanged (their
    attention and MLP outputs projected to zero)."""
    for i in indices:
        layer = model.model.layers[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def test_the_angular_block_is_the_one_that_changes_the_hidden_states_least() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = identity_layers(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2)), 2, 3)
    rows = [torch.randint(0, VOCAB, (12,)).tolist() for _ in range(3)]
    assert angular_block_indices(model, 4, rows) == [0, 1, 4, 5]  # layers 2-3 do nothing: they go
    assert kept_layer_indices(6, 4) == [0, 2, 3, 5]  # where evenly spaced layers would keep both
    assert angular_block_indices(model, 6, rows) == list(range(6))
    reference = [layer.mlp.up_proj.weight.clone() for layer in model.model.layers]
    assert keep_decoder_layers(model, 4, "angular_block", rows) == [0, 1, 4, 5]
    assert model.config.num_hidden_layers == 4
    torch.testing.assert_close(model.model.layers[2].mlp.up_proj.weight, reference[4])  # weights as they were
    assert model(input_ids=torch.tensor([rows[0]])).logits.shape == (1, 12, VOCAB)


def test_distill_cuts_the_angular_block_by_default_from_the_training_rows(tmp_path, tiny_model_dir, qa_file) -> None:
    from rich.console import Console

    from qatune.runtime import Runtime

    shutil.copytree(tiny_model_dir, tmp_path / "teacher")  # its tokenizer; the weights are replaced
    model = identity_layers(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32), 2)
    model.save_pretrained(tmp_path / "teacher")
    config = tiny_config(tmp_path, tmp_path / "teacher", qa_file, "train.stage=distill", "distill.student_layers=3",
                         "method.name=full", "train.max_steps=1", "train.eval_at_start=false")
    said = io.StringIO()
    result = train(config, Runtime.detect(Console(file=said, width=400)))
    assert "Student: 3 of the model's 4 decoder layers (angular_block): 0-1, 3" in said.getvalue()
    assert json.loads((result.output_dir / "config.json").read_text())["num_hidden_layers"] == 3


def test_the_layer_choice_defaults_to_the_angular_block_where_it_can_keep_first_and_last() -> None:
    from qatune.config import load_config

    assert load_config(None, ["distill.student_layers=15"]).distill.layer_choice == "angular_block"
    assert load_config(None, ["distill.student_layers=1"]).distill.layer_choice == "evenly_spaced"
    chosen = load_config(None, ["distill.student_layers=15", "distill.student_layer_choice=evenly_spaced"])
    assert chosen.distill.layer_choice == "evenly_spaced"


def test_an_angular_block_needs_two_layers_left() -> None:
    from qatune.config import load_config
    from qatune.errors import ConfigError

    with pytest.raises(ConfigError, match="student_layers=1 is too few"):
        load_config(None, ["distill.student_layers=1", "distill.student_layer_choice=angular_block"])


def test_an_angular_block_without_student_layers_is_refused_not_ignored() -> None:
    from qatune.config import load_config
    from qatune.errors import ConfigError

    with pytest.raises(ConfigError, match="set distill.student_layers=N"):
        load_config(None, ["distill.student_layer_choice=angular_block"])


@pytest.mark.slow
def test_distilling_lowers_the_divergence_to_the_teacher_faster_than_cross_entropy(
        tmp_path, tiny_model_dir, qa_file, monkeypatch) -> None:
    from qatune.data.prepare import load_prepared
    from qatune.train import distill

    teacher = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    divergences = {}
    for alpha in (0.0, 1.0):  # alpha 0: cross-entropy alone, same student, data and steps
        if alpha == 0:  # ...which loads no teacher
            monkeypatch.setattr(distill, "load_teacher", lambda *args: pytest.fail("alpha 0 loaded the teacher"))
        else:
            monkeypatch.undo()
        config = tiny_config(tmp_path / f"alpha{alpha}", tiny_model_dir, qa_file, "train.stage=distill",
                             "distill.student_layers=2", f"distill.alpha={alpha}", "distill.temperature=1",
                             "method.name=full", "train.max_steps=10", "train.learning_rate=3e-3",
                             "train.eval_at_start=false", "model.dtype=float32")
        result = train(config)
        held_out = load_prepared(tmp_path / f"alpha{alpha}" / "data").validation
        student = load_model(ModelConfig(name_or_path=str(result.output_dir)), dtype=torch.float32)
        assert student.config.num_hidden_layers == 2
        divergences[alpha] = held_out_divergence(student, teacher, held_out)
    start = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    keep_decoder_layers(start, 2)
    before = held_out_divergence(start, teacher, held_out)
    assert divergences[1.0] < before, divergences
    assert divergences[1.0] < divergences[0.0] * 0.7, (before, divergences)


def test_a_teacher_with_another_tokenizer_is_refused_by_name(tmp_path, tiny_model_dir, qa_file, tokenizer) -> None:
    other = tmp_path / "other-teacher"
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    model.save_pretrained(other)
    changed = tokenizer.__class__.from_pretrained(str(tiny_model_dir))
    changed.add_tokens(["<extra_token_for_the_test>"])
    changed.save_pretrained(other)
    assert "vocabulary sizes differ" in tokenizer_difference(tokenizer, changed)
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, "train.stage=distill", f"distill.teacher={other}",
                         "method.name=full", "train.max_steps=1")
    with pytest.raises(DistillError, match="do not share a tokenizer: vocabulary sizes differ"):
        train(config)


@pytest.mark.parametrize("overrides, message", [
    (["train.stage=distill"], "neither distill.teacher nor distill.student_layers"),
    (["train.stage=distill", "distill.student_layers=2", "method.name=lora"], "would save only an adapter"),
])
def test_unfit_settings_are_config_problems(tmp_path, tiny_model_dir, qa_file, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, tiny_model_dir, qa_file, *overrides)


@pytest.mark.slow
def test_a_student_cut_from_the_default_model_saves_exports_and_answers(tmp_path, qa_file) -> None:
    from qatune.config import load_config
    from qatune.export.run import export

    config = load_config(None, [
        "model=default", f"data.sources=[{qa_file}]", f"data.output_dir={tmp_path / 'data'}",
        f"train.output_dir={tmp_path / 'student'}", "data.val_size=0", "data.clean.near_dedup=false",
        "data.max_length=96", "train.stage=distill", "distill.student_layers=4", "method.name=full",
        "train.max_steps=2", "train.per_device_batch_size=2", "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-4", "train.report_to=none", "train.preview_questions=0",
    ])
    result = train(config)
    out = result.output_dir
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 4
    assert result.report.total_parameters < 0.5 * 134_515_008  # the default model's 135M, embeddings included
    exported = export(load_config(None, [f"model={out}", f"export.output_dir={tmp_path / 'exported'}",
                                         "export.gguf=f16", "export.check_questions=['What is a spider?']",
                                         "export.check_max_new_tokens=8"]))
    checks = exported.report.checks
    # the folder written and its GGUF answer like the student as trained, token for token
    assert checks["saved"]["identical"] == 1 and checks["gguf"]["identical"] == 1, checks
    assert exported.report.smoke_answer["answer"].strip()

"""The chunked cross-entropy over labelled tokens equals transformers' own causal-LM loss, value and
gradients, whatever the chunking."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from qatune.data.templates import IGNORE_INDEX
from qatune.train.loss import LabelledCrossEntropy, plain_output_layer

VOCAB, HIDDEN = 50, 16


def problem(trainable_weight: bool) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, HIDDEN, generator=generator, requires_grad=True)
    layer = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    layer.weight.data = torch.randn(VOCAB, HIDDEN, generator=generator)
    layer.weight.requires_grad_(trainable_weight)
    labels = torch.randint(0, VOCAB, (2, 9), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    return hidden, layer, labels


@pytest.mark.parametrize("trainable_weight", [False, True])
@pytest.mark.parametrize("chunk_tokens", [3, 1000])
@pytest.mark.parametrize("num_items", [None, 23])
def test_equals_the_transformers_loss_and_its_gradients(trainable_weight, chunk_tokens, num_items) -> None:
    hidden, layer, labels = problem(trainable_weight)
    expected = ForCausalLMLoss(layer(hidden), labels, VOCAB, num_items_in_batch=num_items)
    expected.backward()
    want_hidden = hidden.grad.clone()
    want_weight = layer.weight.grad.clone() if trainable_weight else None
    hidden.grad = layer.weight.grad = None

    loss_func = LabelledCrossEntropy(layer, torch.float32, chunk_tokens)
    got = loss_func(SimpleNamespace(hidden_states=(hidden,)), labels, num_items)
    (got * 2).backward()  # the upstream gradient reaches both inputs
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, 2 * want_hidden)
    if trainable_weight:
        torch.testing.assert_close(layer.weight.grad, 2 * want_weight)
    else:
        assert layer.weight.grad is None
    # What the model is asked for: its last hidden state, and logits for no position at all.
    assert loss_func.model_kwargs["logits_to_keep"].numel() == 0


def test_bf16_matches_the_model_computing_in_bf16() -> None:
    hidden, layer, labels = problem(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ForCausalLMLoss(layer(hidden), labels, VOCAB)
    got = LabelledCrossEntropy(layer, torch.bfloat16, 4)(SimpleNamespace(hidden_states=(hidden,)), labels)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_only_a_plain_projection_is_taken(tiny_model_dir) -> None:
    from qatune.config import ModelConfig
    from qatune.models import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    assert plain_output_layer(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0  # Gemma 2: logits are reshaped, the model's loss is needed
    assert plain_output_layer(model) is None
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    assert plain_output_layer(model) is None

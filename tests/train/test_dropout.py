"""LeanDropout: the rate and the expectation of nn.Dropout, one mask for forward and backward,
repeatable from torch's seed, swapped into peft's LoRA layers."""

from __future__ import annotations

import pytest
import torch

from qatune.compat.peft import lora_dropout_replaced
from qatune.train.dropout import LeanDropout, plain_lora_dropouts


def test_drops_at_the_rate_keeps_the_expectation_and_backs_through_the_same_mask() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = LeanDropout(0.05).train()(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.05, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    y.backward(torch.full_like(y, 3.0))
    torch.testing.assert_close(x.grad, 3.0 * y.detach())


def test_repeats_from_the_seed_and_is_the_identity_in_eval() -> None:
    x = torch.randn(64, 32, dtype=torch.bfloat16)
    dropout = LeanDropout(0.3)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first) and first.dtype == torch.bfloat16
    assert not torch.equal(dropout(x), first), "the generator moves on"
    assert dropout.eval()(x) is x
    assert LeanDropout(0.0).train()(x) is x


def test_replaces_the_dropout_of_every_lora_layer_while_training(tiny_model_dir) -> None:
    from peft import LoraConfig, get_peft_model

    from qatune.config import ModelConfig
    from qatune.models import load_model

    model = get_peft_model(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert plain_lora_dropouts(model) == 2 * model.config.num_hidden_layers
    with lora_dropout_replaced(model, lambda dropout: LeanDropout(dropout.p)) as swapped:
        assert swapped == 2 * model.config.num_hidden_layers
        dropouts = [m for m in model.modules() if isinstance(m, LeanDropout)]
        assert len(dropouts) == 2 * model.config.num_hidden_layers and {d.p for d in dropouts} == {0.1}
        assert not any(type(m) is torch.nn.Dropout for m in model.modules())
        assert plain_lora_dropouts(model) == 0, "nothing left to swap"
    assert plain_lora_dropouts(model) == 2 * model.config.num_hidden_layers, "the model is as loaded again"
    assert not any(isinstance(m, LeanDropout) for m in model.modules())

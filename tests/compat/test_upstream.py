"""Each touch of a library's private API or global state (src/qatune/compat/) against the library
installed: a test here fails by name when an upgrade renames or reshapes what qatune relies on, and
each context manager leaves the state as it found it."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any
import os
import random
import signal

import pytest
import torch


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_torch_cpu_feature_probes_exist() -> None:
    from qatune.compat.torch import cpu_has_native_bf16

    assert callable(torch.cpu._is_avx512_bf16_supported) and callable(torch.cpu._is_amx_tile_supported)
    assert isinstance(cpu_has_native_bf16(), bool)


def test_seeded_repeats_and_leaves_the_callers_random_state() -> None:
    from qatune.compat.torch import seeded

    random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), torch.rand(1).item())
    random.seed(1)
    torch.manual_seed(1)
    with seeded(42):
        first = torch.rand(3)
    with seeded(42):
        assert torch.equal(torch.rand(3), first)
    assert (random.random(), torch.rand(1).item()) == expected


def test_the_trainer_private_methods_qatune_overrides_keep_their_signatures() -> None:
    from transformers import Trainer

    from qatune.compat.transformers import TrainerOverrides

    assert parameters(Trainer._get_num_items_in_batch) == ["self", "batch_samples", "device"]
    assert parameters(Trainer._track_num_input_tokens) == ["self", "inputs"]
    assert parameters(Trainer._get_train_sampler) == ["self", "train_dataset"]
    assert "_initial_num_input_tokens_seen" in inspect.getsource(Trainer)  # tokens_seen_this_run reads it
    for name in ("_get_num_items_in_batch", "_track_num_input_tokens", "_get_train_sampler"):
        assert parameters(getattr(TrainerOverrides, name)) == parameters(getattr(Trainer, name)), name


def test_registered_attention_is_removed_again() -> None:
    from transformers import AttentionInterface

    from qatune.compat.transformers import registered_attention

    assert isinstance(AttentionInterface._global_mapping, dict)
    with registered_attention("qatune_probe", lambda *a, **k: None):
        assert "qatune_probe" in AttentionInterface._global_mapping
        assert "qatune_probe" in AttentionInterface()
    assert "qatune_probe" not in AttentionInterface._global_mapping


def test_attention_implementation_is_put_back(tiny_model_dir) -> None:
    from qatune.compat.transformers import attention_implementation
    from qatune.config import ModelConfig
    from qatune.models import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)
    before = model.config._attn_implementation
    with attention_implementation(model, "eager"):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before


def test_the_forward_takes_its_cache_by_the_keyword_we_pass(tiny_model_dir) -> None:
    from transformers import DynamicCache

    from qatune.compat.transformers import cache_keyword
    from qatune.config import ModelConfig
    from qatune.models import load_model

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32).eval()
    keyword = cache_keyword(model)
    assert keyword in inspect.signature(model.forward).parameters
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{keyword: cache})
    assert cache.get_seq_length() == 3, "the cache we passed is the one filled"


def test_progress_bars_are_restored() -> None:
    from transformers.utils import logging

    from qatune.compat.transformers import progress_bars_off

    logging.enable_progress_bar()
    with progress_bars_off():
        assert not logging.is_progress_bar_enabled()
    assert logging.is_progress_bar_enabled()


def test_peft_lora_layers_keep_their_dropout_dict_and_input_cast_switch(tiny_model_dir) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    from qatune.compat.peft import input_casts_off, lora_dropout_replaced
    from qatune.config import ModelConfig
    from qatune.models import load_model

    assert parameters(disable_input_dtype_casting) == ["model", "active"]
    model = get_peft_model(load_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32),
                           LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    assert layers and all(type(m.lora_dropout["default"]) is torch.nn.Dropout for m in layers)
    with lora_dropout_replaced(model, lambda dropout: torch.nn.Identity()) as replaced:
        assert replaced == len(layers) and all(type(m.lora_dropout["default"]) is torch.nn.Identity for m in layers)
    assert all(type(m.lora_dropout["default"]) is torch.nn.Dropout for m in layers)
    with input_casts_off(model):
        pass


def test_environment_defaults_keep_the_users_setting_and_clean_up(monkeypatch) -> None:
    from qatune.compat.process import environment_defaults

    monkeypatch.setenv("QATUNE_PROBE_SET", "mine")
    monkeypatch.delenv("QATUNE_PROBE_NEW", raising=False)
    with environment_defaults({"QATUNE_PROBE_SET": "64", "QATUNE_PROBE_NEW": "64"}):
        assert os.environ["QATUNE_PROBE_SET"] == "mine" and os.environ["QATUNE_PROBE_NEW"] == "64"
    assert os.environ["QATUNE_PROBE_SET"] == "mine" and "QATUNE_PROBE_NEW" not in os.environ


def test_signal_handlers_are_put_back() -> None:
    from qatune.compat.process import signal_handlers

    before = signal.getsignal(signal.SIGTERM)
    caught: list[int] = []
    with signal_handlers(lambda signum, frame: caught.append(signum)):
        signal.raise_signal(signal.SIGTERM)
    assert caught == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is before


def test_logger_levels_are_put_back() -> None:
    import logging

    from qatune.compat.process import logger_levels

    logger = logging.getLogger("qatune.probe")
    logger.setLevel(logging.DEBUG)
    with logger_levels({"qatune.probe": logging.ERROR}):
        assert logger.level == logging.ERROR
    assert logger.level == logging.DEBUG


def test_datasets_progress_bars_are_restored() -> None:
    import datasets

    from qatune.compat.datasets import progress_bars_off

    datasets.enable_progress_bars()
    with progress_bars_off():
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()


def test_uvicorns_h11_protocol_keeps_what_the_head_deadline_relies_on() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from qatune.compat.uvicorn import BoundedH11Protocol

    for name in ("connection_made", "on_response_complete", "connection_lost"):
        assert parameters(getattr(BoundedH11Protocol, name)) == parameters(getattr(H11Protocol, name)), name
    source = inspect.getsource(H11Protocol)
    assert all(f"self.{attribute}" in source for attribute in ("cycle", "transport", "loop"))


def test_bitsandbytes_4bit_layers_keep_the_cpu_kernel_switch() -> None:
    bnb = pytest.importorskip("bitsandbytes")

    from qatune.compat.bitsandbytes import keep_4bit_weights_differentiable

    layer = torch.nn.Sequential(bnb.nn.Linear4bit(8, 8))
    assert hasattr(layer[0], "support_avx512bf16_for_cpu"), "bitsandbytes renamed the switch qlora turns off"
    assert keep_4bit_weights_differentiable(layer) == 1 and layer[0].support_avx512bf16_for_cpu is False


def test_bitsandbytes_optimizer_overrides_end_with_the_training_and_the_earlier_ones_come_back() -> None:
    """What the Trainer registers for an 8-bit optimizer (its embeddings' 32-bit state) is dropped when the
    training ends; an override the caller made before stays."""
    bnb = pytest.importorskip("bitsandbytes")

    from qatune.compat.bitsandbytes import optimizer_overrides_scoped

    manager = bnb.optim.GlobalOptimManager.get_instance()
    assert {"pid2config", "index2config", "module_weight_config_triple"} <= set(vars(manager)), \
        "bitsandbytes renamed the override tables qatune resets"
    callers, trainings = torch.nn.Embedding(4, 2), torch.nn.Embedding(4, 2)
    manager.override_config([callers.weight], key_value_dict={"optim_bits": 32})
    try:
        with optimizer_overrides_scoped():
            manager.register_module_override(trainings, "weight", {"optim_bits": 32})  # as the Trainer does
            manager.override_config([trainings.weight], key_value_dict={"optim_bits": 32})
            assert id(trainings.weight) in manager.pid2config
        assert id(trainings.weight) not in manager.pid2config
        assert all(module is not trainings for module, _, _ in manager.module_weight_config_triple)
        assert manager.pid2config[id(callers.weight)] == {"optim_bits": 32}
    finally:
        manager.initialize()


def test_trl_preference_trainers_keep_what_the_preference_stage_relies_on() -> None:
    pytest.importorskip("trl")
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from qatune.compat.transformers import TrainerOverrides
    from qatune.compat.trl import preference_trainer

    for trainer in (DPOTrainer, KTOTrainer):
        source = inspect.getsource(trainer)
        assert 'add_adapter("ref"' in source  # the copy of a PeftModel's adapter that the stage deletes...
        assert '"ref" if "ref" in' in source  # ...after which the reference is the model with adapters off
    for trainer in (CPOTrainer, ORPOTrainer):  # paired batches under chosen_/rejected_ keys, no input_ids
        source = inspect.getsource(trainer.tokenize_row)
        assert '"chosen_": chosen_sequence_tokens' in source and '"attention_mask"' in source
    subclass = preference_trainer(DPOTrainer)
    assert subclass.__mro__[1:3] == (TrainerOverrides, DPOTrainer)
    assert parameters(subclass._track_num_input_tokens) == parameters(DPOTrainer._track_num_input_tokens)


def test_trls_fused_lm_head_on_a_cpu_scores_answer_positions_only_with_the_same_result(tiny_model_dir) -> None:
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    from qatune.compat.trl import CPU_VOCAB_TILE, labelled_positions_only

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    utils.add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 10:] = -100  # padding
    scored = []
    apply = chunked_logprob.ChunkedLogProbFunction.apply

    def counting(hidden, weight, bias, targets, temperature, tile, *rest):
        scored.append((hidden.shape[0], tile))
        return apply(hidden, weight, bias, targets, temperature, tile, *rest)

    def log_probs_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        out.sum().backward()
        return out.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()

    before = (utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", counting)
        trl_own = log_probs_and_gradient()
        with labelled_positions_only():
            ours = log_probs_and_gradient()
    assert (utils._use_triton, utils._CHUNKED_LOGPROB_CHUNK_SIZE) == before
    assert scored == [(2 * 11, before[1]), (5 + 3, CPU_VOCAB_TILE)]  # every shifted position, then labelled ones
    torch.testing.assert_close(ours[0], trl_own[0])
    torch.testing.assert_close(ours[1], trl_own[1])


def fused_dpo_forward(tiny_model_dir, batch: dict, prompts_once: bool) -> tuple[Any, torch.Tensor, list]:
    """TRL's fused forward of a DPO batch (with qatune's prompt-once rows or not), a gradient, and its calls."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils

    from qatune.compat.trl import run_prompts_once

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    fused, calls = model.forward, []
    model.forward = counted = lambda **kwargs: calls.append(kwargs) or fused(**kwargs)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with run_prompts_once(model) if prompts_once else nullcontext():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    assert model.forward is counted  # the patch is undone
    out.log_probs.sum().backward()
    return out, model.model.layers[0].self_attn.q_proj.weight.grad, calls


def test_dpo_pairs_run_their_prompt_once_with_the_scores_of_separate_rows(tiny_model_dir) -> None:
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pairs = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13, 14, 15, 16, 17]},
             {"prompt_ids": [20, 21, 22, 23, 24, 25, 26], "chosen_ids": [27, 28, 29, 30], "rejected_ids": [31]}]
    batch = DataCollatorForPreference(pad_token_id=0)(pairs)  # TRL's own batch: [chosen rows; rejected rows]
    trl_own, trl_gradient, _ = fused_dpo_forward(tiny_model_dir, batch, prompts_once=False)
    ours, gradient, calls = fused_dpo_forward(tiny_model_dir, batch, prompts_once=True)
    assert [tuple(call["input_ids"].shape) for call in calls] == [(2, 4 + 3 + 1 + 6)]  # one row a pair
    assert calls[0]["attention_mask"].ndim == 4 and "shift_labels" in calls[0]
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(ours, name), getattr(trl_own, name), atol=1e-5, rtol=1e-4)
    assert torch.equal(ours.label_mask, trl_own.label_mask) and torch.equal(ours.is_top1, trl_own.is_top1)
    torch.testing.assert_close(ours.loss, trl_own.loss)
    torch.testing.assert_close(gradient, trl_gradient, atol=1e-5, rtol=1e-4)

    pairs[1]["rejected_ids"] = []  # an empty answer: the batch goes through TRL's rows unchanged
    _, _, calls = fused_dpo_forward(tiny_model_dir, DataCollatorForPreference(pad_token_id=0)(pairs), True)
    assert [tuple(call["input_ids"].shape) for call in calls] == [(4, 7 + 4)] and "shift_labels" not in calls[0]


def test_the_reference_pass_of_a_lora_run_scores_log_probs_alone(tiny_model_dir) -> None:
    pytest.importorskip("trl")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils

    from qatune.compat.trl import lean_reference_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))  # as TRL's trainers do
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trl_forward = peft_model.get_base_model().forward
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    labels = ids.masked_fill(torch.arange(9) < 4, -100)

    def scores() -> Any:
        return peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)

    with lean_reference_head(peft_model.get_base_model()):
        with torch.no_grad():
            tuned = scores()  # evaluation: adapters on, TRL's metric fields kept
            with peft_model.disable_adapter():
                reference = scores()
        assert tuned.entropy is not None and reference.entropy is None and reference.mean_logits is None
        assert not torch.allclose(tuned.log_probs, reference.log_probs)  # the adapter was off for the reference
        with peft_model.disable_adapter():
            with_grad = scores()  # a pass with gradient is never the reference
        assert with_grad.entropy is not None
        torch.testing.assert_close(with_grad.log_probs.detach(), reference.log_probs)
    assert peft_model.get_base_model().forward is trl_forward  # TRL's head again, with its metric fields
    with torch.no_grad(), peft_model.disable_adapter():
        assert scores().entropy is not None


def test_llama_cpp_models_load_without_extra_buffers_where_the_cpu_has_amx(monkeypatch) -> None:
    llama_cpp = pytest.importorskip("llama_cpp.llama_cpp")
    from qatune.compat import llama_cpp as compat

    assert "use_extra_bufts" in dict(llama_cpp.llama_model_params._fields_)  # the switch model_params sets
    assert "llama_model_default_params()" in inspect.getsource(pytest.importorskip("llama_cpp.llama").Llama.__init__)
    defaults = llama_cpp.llama_model_default_params
    for amx in (True, False):
        monkeypatch.setattr(compat, "cpu_has_amx", lambda amx=amx: amx)
        assert compat.model_params(llama_cpp).use_extra_bufts is not amx
        with compat.plain_cpu_buffers():
            assert llama_cpp.llama_model_default_params().use_extra_bufts is not amx
        assert llama_cpp.llama_model_default_params is defaults
    assert llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's own default is left as it was


@pytest.mark.parametrize("module", ["torch", "transformers", "peft", "datasets", "process", "uvicorn",
                                    "bitsandbytes", "trl", "llama_cpp"])
def test_every_compat_module_is_documented(module) -> None:
    import importlib

    assert importlib.import_module(f"qatune.compat.{module}").__doc__

"""Log-likelihood scoring: batched and left-padded gives the unpadded numbers, and the training loss."""

from __future__ import annotations

import pytest
import torch

from qatune.config import SourceConfig
from qatune.data.templates import IGNORE_INDEX, resolve_template
from qatune.eval.scoring import (
    choice_predictions,
    corpus_perplexity,
    labelled_logprobs,
    reference_losses,
)
from qatune.eval.sets import load_eval_set
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, resolve_template(tokenizer)


def _hf_loss_sum(model, ids, labels):
    """Hugging Face's own mean loss over labelled tokens, times their count."""
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    return -loss * sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def test_batched_left_padded_scores_equal_single_unpadded(tiny):
    model, _, _ = tiny
    g = torch.Generator().manual_seed(0)
    samples = []
    for length, answer in ((9, 3), (23, 7), (14, 1), (31, 12), (5, 4)):
        ids = torch.randint(10, 1000, (length,), generator=g).tolist()
        samples.append((ids, [IGNORE_INDEX] * (length - answer) + ids[-answer:]))
    batched = labelled_logprobs(model, samples, pad_id=2, batch_size=8)
    for (ids, labels), (total, count) in zip(samples, batched):
        assert count == sum(1 for x in labels if x != IGNORE_INDEX)
        assert total == pytest.approx(_hf_loss_sum(model, ids, labels), abs=1e-3)
        single, = labelled_logprobs(model, [(ids, labels)], pad_id=2, batch_size=1)
        assert single[0] == pytest.approx(total, abs=1e-3)


def test_reference_loss_is_the_training_loss_on_the_answer(tiny, tmp_path):
    from qatune.data.templates import tokenize

    model, tokenizer, template = tiny
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "什么是高血压？", "answer": "动脉血压持续升高。"},
                                                {"question": "Who wrote Hamlet?", "answer": "Shakespeare."}])
    items = load_eval_set(SourceConfig(path=str(path))).qa
    losses = reference_losses(model, tokenizer, template, items, max_length=128, pad_id=2)
    for item, (loss, count) in zip(items, losses):
        (_, (sample,)), = tokenize([item.conversation], tokenizer, template, 128, train_on_prompt=False)
        assert count == sum(1 for x in sample.labels if x != IGNORE_INDEX)  # answer + <|im_end|>
        assert loss == pytest.approx(-_hf_loss_sum(model, sample.input_ids, sample.labels) / count, abs=1e-4)
    tokens = sum(c for _, c in losses)
    assert corpus_perplexity(losses) == pytest.approx(torch.exp(torch.tensor(
        sum(loss * c for loss, c in losses) / tokens)).item())
    assert corpus_perplexity([None]) is None


def test_choice_picks_the_most_likely_text(tiny, tmp_path):
    model, tokenizer, template = tiny
    path = write_jsonl(tmp_path / "mcq.jsonl", [{"question": "2+2=?", "choices": ["4", "five", "22"], "answer": "A"}])
    items = load_eval_set(SourceConfig(path=str(path))).choice
    (result,) = choice_predictions(model, tokenizer, template, items, pad_id=2)
    totals = result["logprobs"]
    assert result["pick"] == max(range(3), key=totals.__getitem__)
    per_char = [t / len(c) for t, c in zip(totals, items[0].choices)]
    assert result["pick_norm"] == max(range(3), key=per_char.__getitem__)

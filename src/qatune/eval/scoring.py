"""Scores read off the model's probabilities: perplexity on reference answers, multiple-choice accuracy.

Both sum the log-probability of labelled tokens after a prompt. Sequences are left-padded so
that every row ends at the last position: only the last positions' logits are computed, and the
49k-wide vocabulary is never projected for prompt tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from qatune.data.templates import IGNORE_INDEX, ChatTemplate, tokenize
from qatune.eval.sets import ChoiceItem, QAItem
from qatune.infer.generation import prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def labelled_logprobs(model: "PreTrainedModel", samples: list[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int = 8) -> list[tuple[float, int]]:
    """For each (input_ids, labels): the summed log-probability of tokens whose label is not ignored, and their count."""
    import torch

    from qatune.infer.generation import evaluating, left_pad, length_sorted_batches

    results: list[tuple[float, int] | None] = [None] * len(samples)
    with evaluating(model) as device:
        for rows in length_sorted_batches([len(ids) for ids, _ in samples], batch_size):
            ids = left_pad([samples[i][0] for i in rows], pad_id)
            labels = left_pad([samples[i][1] for i in rows], IGNORE_INDEX)
            mask = left_pad([[1] * len(samples[i][0]) for i in rows], 0)
            longest = ids.shape[1]
            labelled = (labels != IGNORE_INDEX).nonzero()
            # Logits at position t predict token t+1: keep from one before the first labelled token.
            keep = longest - int(labelled[:, 1].min()) + 1 if len(labelled) else 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=keep).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = labels[:, longest - keep + 1:].to(device)
            picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            valid = targets != IGNORE_INDEX
            for i, total, count in zip(rows, (picked * valid).sum(-1).tolist(), valid.sum(-1).tolist()):
                results[i] = (total, count)
    return results


def reference_losses(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", template: ChatTemplate,
                     items: list[QAItem], max_length: int, pad_id: int,
                     batch_size: int = 8) -> list[tuple[float, int] | None]:
    """Each reference's mean loss per answer token and its token count (assistant tokens only, as in
    training, end-of-turn included); None where the conversation cannot fit max_length."""
    convs = [item.conversation for item in items]
    samples, owners = [], []
    for index, (_, built) in enumerate(tokenize(convs, tokenizer, template, max_length, train_on_prompt=False)):
        if built:
            samples.append((built[0].input_ids, built[0].labels))
            owners.append(index)
    losses: list[tuple[float, int] | None] = [None] * len(items)
    for index, (total, count) in zip(owners, labelled_logprobs(model, samples, pad_id, batch_size)):
        losses[index] = (-total / count, count) if count else None
    return losses


def text_losses(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", texts: list[str], max_length: int,
                pad_id: int, batch_size: int = 8) -> list[tuple[float, int] | None]:
    """Each plain text's mean loss per token and its token count, as a pt stage trains it (no template,
    every token after the first predicted, eos at the end); a text is cut to max_length tokens."""
    samples = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_length - 1] + [tokenizer.eos_token_id]
        samples.append((ids, [IGNORE_INDEX] + ids[1:]))  # nothing predicts the first token
    return [(-total / count, count) if count else None
            for total, count in labelled_logprobs(model, samples, pad_id, batch_size)]


def corpus_perplexity(losses: list[tuple[float, int] | None]) -> float | None:
    """exp of the token-weighted mean loss over all reference answers."""
    pairs = [pair for pair in losses if pair is not None]
    tokens = sum(n for _, n in pairs)
    return math.exp(sum(loss * n for loss, n in pairs) / tokens) if tokens else None


def choice_predictions(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", template: ChatTemplate,
                       items: list[ChoiceItem], pad_id: int, batch_size: int = 8) -> list[dict[str, int | list[float]]]:
    """Pick each item's choice by log-likelihood, the cloze way of lm-evaluation-harness.

    The question is the user turn; each choice's text is scored as the assistant's answer.
    `pick` takes the highest total log-likelihood (harness `acc`), `pick_norm` the highest per
    character (harness `acc_norm`, fairer between long and short choices).
    """
    samples: list[tuple[list[int], list[int]]] = []
    for item in items:
        prompt = prompt_ids(tokenizer, template.source, [{"role": "user", "content": item.question}])
        for choice in item.choices:
            answer = tokenizer.encode(choice, add_special_tokens=False)
            samples.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    scores = iter(labelled_logprobs(model, samples, pad_id, batch_size))
    out = []
    for item in items:
        totals = [next(scores)[0] for _ in item.choices]
        per_char = [total / max(len(choice), 1) for total, choice in zip(totals, item.choices)]
        out.append({"pick": max(range(len(totals)), key=totals.__getitem__),
                    "pick_norm": max(range(len(per_char)), key=per_char.__getitem__),
                    "logprobs": [round(t, 4) for t in totals]})
    return out

"""Preference pairs as an evaluation: does a model give its chosen answer a higher likelihood than the rejected one?

For each (prompt, chosen, rejected) the log-probability of each answer (its tokens and the end-of-turn token,
after the prompt rendered with the chat template) is summed; the pairwise win-rate is the share of pairs whose
chosen answer scores higher, and the margin is chosen minus rejected. This is DPO's reward accuracy measured
on the model alone (no reference), so base and tuned models compare on the same footing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qatune.data.templates import ChatTemplate

Pair = tuple[list[dict[str, str]], str, str]  # prompt messages, chosen answer, rejected answer


def answer_logprobs(model: Any, tokenizer: Any, template: "ChatTemplate", prompt: list[dict[str, str]],
                    answers: list[str]) -> list[float]:
    """The summed log-probability of each answer (with its end-of-turn token) after `prompt`."""
    import torch

    from qatune.data.templates import encode_pieces, render

    prompt_text = render(tokenizer, template.source, prompt, add_generation_prompt=True)
    prompt_ids, *answer_ids = encode_pieces(tokenizer, [prompt_text] + [a + template.end_of_turn for a in answers])
    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for ids in answer_ids:
            sequence = torch.tensor([prompt_ids + ids], device=device)
            logits = model(input_ids=sequence).logits[0, len(prompt_ids) - 1:-1].float()
            targets = sequence[0, len(prompt_ids):]
            scores.append(float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()))
    return scores


def pairwise(model: Any, tokenizer: Any, template: "ChatTemplate", pairs: list[Pair]) -> dict[str, Any]:
    """Win-rate (share of pairs whose chosen answer is likelier) and the mean and per-pair margins."""
    was_training = model.training
    model.eval()
    try:
        margins = [chosen - rejected for chosen, rejected in
                   (answer_logprobs(model, tokenizer, template, prompt, [c, r]) for prompt, c, r in pairs)]
    finally:
        model.train(was_training)
    return {"pairs": len(margins), "win_rate": sum(m > 0 for m in margins) / len(margins) if margins else None,
            "mean_margin": sum(margins) / len(margins) if margins else None, "margins": margins}

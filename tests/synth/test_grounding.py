"""from-docs keeps its pairs grounded: a question the model left unanswered takes the cited chunk's best
sentences (answer_source: extract), answers the chunk does not support are dropped and counted, and the
weak default model turns a two-section policy document into cited pairs."""

from __future__ import annotations

import json

import pytest

from qatune.config import load_config
from qatune.synth.from_docs import from_docs
from qatune.synth.grounding import extract_answer, supported
from qatune.synth.prompts import parse_questions

POLICY = """# Travel policy

## Daily allowance

Employees on business trips receive a daily allowance that depends on the city tier. Tier 1 cities \
(Beijing, Shanghai, Guangzhou, Shenzhen) pay 500 yuan per day. Tier 2 cities pay 350 yuan per day. All other \
cities pay 250 yuan per day.

## Hotel receipts

Hotel costs are reimbursed only against an official invoice. Submit hotel receipts within 30 days of the end \
of the trip. Receipts submitted later are not reimbursed.
"""


def test_questions_without_answers_are_read_too() -> None:
    assert parse_questions("Q: How much is the allowance in Shanghai?\nQ: When are receipts due?\nA: In 30 days.") == [
        ("How much is the allowance in Shanghai?", None), ("When are receipts due?", "In 30 days.")]
    # the default model's habit: a bare question, no marker at all
    bare = "How can I find out if my hotel has been approved with the official invoice?\nThank you."
    assert parse_questions(bare) == [("How can I find out if my hotel has been approved with the official invoice?",
                                      None)]


def test_the_best_answering_sentences_are_extracted_and_unsupported_answers_spotted() -> None:
    chunk = POLICY.split("## Hotel receipts")[1]
    assert extract_answer("When must hotel receipts be submitted?", chunk) == (
        "Submit hotel receipts within 30 days of the end of the trip. Receipts submitted later are not reimbursed.")
    assert extract_answer("What is the capital of France?", chunk) is None
    assert supported("Submit the hotel receipts within 30 days.", chunk)
    assert not supported("Paris is the capital of France.", chunk)
    assert extract_answer("城市等级", "出差补贴按城市等级发放。一线城市每天500元。") == "出差补贴按城市等级发放。"


def test_unanswered_questions_get_extracts_and_unsupported_answers_are_dropped(tmp_path) -> None:
    docs = tmp_path / "policy.md"
    docs.write_text(POLICY, encoding="utf-8")
    out = tmp_path / "qa.jsonl"

    def weak_model(prompts: list[str]) -> list[str]:
        return ["How much is the daily allowance in tier 2 cities?\nQ: Who won the 1998 World Cup?\nA: France won it."
                if "allowance" in p.split("Text:")[1] else "Q: Within how many days must hotel receipts be submitted?"
                for p in prompts]

    result = from_docs(load_config(None, [f"from_docs.output={out}"]), docs, generator=weak_model)
    assert result.log.by_reason() == {"unsupported": 1}
    assert [(r["question"], r["provenance"]["answer_source"]) for r in result.records] == [
        ("Within how many days must hotel receipts be submitted?", "extract")]
    # beside a marked pair a bare line is not read as a question: the first chunk gave one pair, unsupported
    record = result.records[0]
    assert record["answer"].startswith("Submit hotel receipts within 30 days of the end of the trip.")
    assert record["answer"].endswith("(Source: policy.md § Travel policy > Hotel receipts)")
    assert result.report["answers_extracted"] == 1
    assert json.loads(out.with_suffix(".dropped.jsonl").read_text().splitlines()[0])["reason"] == "unsupported"


@pytest.mark.slow
def test_the_default_model_makes_cited_pairs_from_a_policy_document(tmp_path) -> None:
    docs = tmp_path / "travel_policy.md"
    docs.write_text(POLICY, encoding="utf-8")
    result = from_docs(load_config(None, [f"from_docs.output={tmp_path / 'qa.jsonl'}"]), docs)
    assert len(result.records) >= 2, result.log.by_reason()
    sections = {r["source"]["section"] for r in result.records}
    assert sections == {"Travel policy > Daily allowance", "Travel policy > Hotel receipts"}
    for record in result.records:
        body, citation = record["answer"].rsplit(" (Source: ", 1)
        assert citation == f"travel_policy.md § {record['source']['section']})"
        assert supported(body, POLICY), record

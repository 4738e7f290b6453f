"""Q&A pairs from documents and question paraphrases: parsing, citations, deduplication against the
existing data and each other, the per-question cap, provenance, and a dataset the data stage reads.
A fake model (an injected generator) makes the outcomes exact; one slow test runs the default model."""

from __future__ import annotations

import json
import re

import pytest

from qatune.config import DataConfig, SourceConfig, load_config
from qatune.data.sources import check
from qatune.errors import DataError
from qatune.synth.augment import augment
from qatune.synth.from_docs import from_docs
from qatune.synth.prompts import parse_pairs, parse_paraphrases
from tests.conftest import write_jsonl

GUIDE = """# Hypertension guide

## Measuring

Rest for five minutes before the first reading. Take two readings one minute apart.

## Referral

Refer the patient the same day when the pressure is 180/120 mmHg or higher.
"""
GUIDE_ZH = """# 糖尿病饮食

## 水果

血糖平稳的患者可以在两餐之间吃水果，每天不超过200克。
"""


def write_docs(folder):
    folder.mkdir()
    (folder / "guide.md").write_text(GUIDE, encoding="utf-8")
    (folder / "饮食.md").write_text(GUIDE_ZH, encoding="utf-8")
    (folder / "hours.txt").write_text("The clinic opens at eight.\n", encoding="utf-8")
    return folder


def fake_docs_model(prompts: list[str]) -> list[str]:
    """A question about each chunk's first sentence, the same off-topic question every time, and no pair
    at all for the clinic hours."""
    outputs = []
    for prompt in prompts:
        text = re.split(r"\nText:\n|\n文字：\n", prompt)[1]
        first = re.split(r"(?<=[.。])", text)[0].strip()
        if "clinic" in text:
            outputs.append("Sorry, I do not know.")
        elif re.search("[\u4e00-\u9fff]", text):
            outputs.append(f"问：关于这一节，文中说了什么？\n答：{first}\n问：What is the capital of France?\n答：Paris is the capital.")
        else:
            outputs.append(f"1. **Q:** What does the text say first about {text[:12]}?\n**A:** {first}\n"
                           "Q: What is the capital of France?\nA: Paris is the capital.")
    return outputs


def test_from_docs_pairs_cite_their_sources_and_skip_existing_data(tmp_path, qa_file) -> None:
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "docs_qa.jsonl"
    config = load_config(None, [f"from_docs.output={out}", f"data.sources=[{qa_file}]"])
    result = from_docs(config, docs, generator=fake_docs_model)

    sections = {"guide.md": {"Hypertension guide > Measuring", "Hypertension guide > Referral"},
                "饮食.md": {"糖尿病饮食 > 水果"}}
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == result.records and len(records) == 3
    for record in records:
        source = record["source"]
        assert source["section"] in sections[source["file"]]
        start, end = source["lines"]
        chunk = "\n".join((docs / source["file"]).read_text(encoding="utf-8").split("\n")[start - 1:end])
        first_sentence = record["answer"].split("(Source")[0].split("（来源")[0].strip()
        assert first_sentence in chunk.replace("\n", " "), "the answer comes from the cited lines"
        citation = f"{source['file']} § {source['section']}"
        assert record["answer"].endswith((f" (Source: {citation})", f"（来源：{citation}）"))
    assert records[2]["answer"].endswith("（来源：饮食.md § 糖尿病饮食 > 水果）")  # Chinese document, Chinese citation

    # The off-topic question is in the existing data (PAIRS): dropped each time, with the record it repeats.
    assert result.log.by_reason() == {"unparseable": 1, "duplicate": 3}
    drops = [json.loads(line) for line in out.with_suffix(".dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {d["reason"] for d in drops} == {"unparseable", "duplicate"}
    assert all(f"existing {qa_file}, line 1" in d["detail"] for d in drops if d["reason"] == "duplicate")
    assert next(d for d in drops if d["reason"] == "unparseable")["location"] == "hours.txt (lines 1-1)"
    report = json.loads(out.with_suffix(".report.json").read_text(encoding="utf-8"))
    assert report["pairs_generated"] == 6 and report["pairs_kept"] == 3 and report["chunks"] == 4
    assert report["existing_questions"] == check([SourceConfig(path=str(qa_file))], DataConfig()).kept

    # A normal qatune dataset: read as qa records, all usable.
    checked = check([SourceConfig(path=str(out))], DataConfig())
    assert list(checked.formats.values()) == [["qa"]] and checked.kept == 3 and checked.errors == 0

    with pytest.raises(DataError, match="already exists"):
        from_docs(config, docs, generator=fake_docs_model)


def test_a_changed_prompt_is_used_and_a_bad_one_is_named(tmp_path) -> None:
    docs = write_docs(tmp_path / "docs")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("SECTION={section} FILE={file} LANG={language} N={pairs}\n{text}", encoding="utf-8")
    seen: list[str] = []
    config = load_config(None, [f"from_docs.output={tmp_path / 'out.jsonl'}", f"from_docs.prompt={prompt}",
                                "from_docs.pairs_per_chunk=5"])
    from_docs(config, docs, generator=lambda prompts: seen.extend(prompts) or ["" for _ in prompts])
    assert "SECTION=糖尿病饮食 > 水果 FILE=饮食.md LANG=中文 N=5\n血糖平稳" in seen[-1]
    prompt.write_text("Questions about {txt}", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown placeholder\(s\) \{txt\}") as error:
        from_docs(config.model_copy(update={"from_docs": config.from_docs.model_copy(update={"overwrite": True})}),
                  docs, generator=fake_docs_model)
    assert str(prompt) in str(error.value)


def test_parsers_read_the_usual_shapes() -> None:
    assert parse_pairs("Here you go:\n1. **Q1:** What is X?\n**A1:** X is Y.\nIt is red.\n") == \
        [("What is X?", "X is Y. It is red.")]
    assert parse_pairs("问题：多少算高血压？\n答案：140/90 以上。") == [("多少算高血压？", "140/90 以上。")]
    assert parse_pairs('[{"question": "Why?", "answer": "Because."}]') == [("Why?", "Because.")]
    assert parse_pairs("Q: a question without an answer") == []
    assert parse_paraphrases('1. "How is X defined?"\n- Paraphrase 2: Define X.\n\n') == ["How is X defined?", "Define X."]


LONG_QUESTION = ("My father has had high blood pressure for ten years and takes his tablets every morning; "
                 "should he also check his pressure at home in the evening?")


def test_augment_deduplicates_caps_and_keeps_provenance(tmp_path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is the capital of France?", "answer": "Paris is the capital.", "system": "Be brief."},
        {"question": "How many legs does a spider have?", "answer": "A spider has eight legs."},
        {"question": LONG_QUESTION, "answer": "Yes, twice a week."},
    ])
    outputs = {
        "What is the capital of France?": [
            "1. What is the capital of France?\n2. what is the capital of france\n"  # the original, twice
            "3. Which city is the capital of France?\n4. Which city is the capital of France?\n"  # kept, then a repeat
            "5. How many legs does a spider have?\n"  # another original question
            "6. Name the capital city of France.\n7. Tell me the French capital city, please.",  # kept, then the cap
            "Which city is France's capital?",  # second sample: over the cap too
        ],
        "How many legs does a spider have?": ["", "- How many legs has a spider got?"],
        LONG_QUESTION: [LONG_QUESTION.replace("ten years", "ten year"),  # near-duplicate of the original
                        "Should my father measure his blood pressure at home in the evening too?"],
    }
    calls: list[str] = []

    def fake(prompts: list[str]) -> list[str]:
        answers = []
        for prompt in prompts:
            question = next(q for q in outputs if prompt.endswith(q))
            answers.append(outputs[question][sum(c == question for c in calls)])
            calls.append(question)
        return answers

    out = tmp_path / "aug.jsonl"
    config = load_config(None, [f"data.sources=[{data}]", f"augment.output={out}", "augment.per_question=2",
                                "augment.samples=2"])
    result = augment(config, generator=fake)
    kept = [(r["question"], r["answer"]) for r in result.records]
    paris = "Paris is the capital."
    assert kept == [("Which city is the capital of France?", paris), ("Name the capital city of France.", paris),
                    ("How many legs has a spider got?", "A spider has eight legs."),
                    ("Should my father measure his blood pressure at home in the evening too?", "Yes, twice a week.")]
    assert result.log.by_reason() == {"unparseable": 1, "duplicate": 4, "near_duplicate": 1, "cap_reached": 2}
    first = result.records[0]
    assert first["system"] == "Be brief."
    assert first["provenance"] == {"original_question": "What is the capital of France?", "source": f"{tmp_path.name}/qa",
                                   "location": f"{data}, line 1", "method": "paraphrase", "teacher": "default",
                                   "prompt": "built-in"}
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == result.records
    assert check([SourceConfig(path=str(out))], DataConfig()).kept == 4
    report = result.report
    assert report["questions_paraphrased"] == 3 and report["candidates"] == 11 and report["paraphrases_kept"] == 4


@pytest.mark.slow
def test_from_docs_with_the_default_model_end_to_end(tmp_path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text(GUIDE, encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    config = load_config(None, [f"from_docs.output={out}", "from_docs.decoding.max_new_tokens=60", "from_docs.pairs_per_chunk=1"])
    result = from_docs(config, docs)
    assert result.report["chunks"] == 2
    assert result.records or result.log.by_reason().get("unparseable")
    for record in result.records:
        assert record["source"]["file"] == "guide.md"
        assert record["source"]["section"] in {"Hypertension guide > Measuring", "Hypertension guide > Referral"}
        assert record["answer"].endswith(f"(Source: guide.md § {record['source']['section']})")
    # Every generated pair is kept or counted, and a chunk without one is counted as unparseable.
    assert result.report["pairs_generated"] == len(result.records) + sum(
        n for reason, n in result.log.by_reason().items() if reason != "unparseable")


def test_plans_decide_the_output_and_the_model_gets_the_sections_decoding(tmp_path, monkeypatch) -> None:
    """A plan writes nothing and says whether it replaces the output (only with --force); setup hands the
    section's decoding and the Runtime to the model generator."""
    from qatune.runtime import Runtime
    from qatune.synth import augment as augment_recipe
    from qatune.synth import from_docs as docs_recipe

    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "out.jsonl"
    config = load_config(None, [f"from_docs.output={out}", "from_docs.decoding.temperature=0.5"])
    runtime = Runtime()
    plan = docs_recipe.plan(config, runtime, docs)
    assert plan.replaces is False and not out.exists()
    out.write_text("kept\n", encoding="utf-8")
    with pytest.raises(DataError, match="already exists"):
        docs_recipe.plan(config, runtime, docs)
    forced = config.model_copy(update={"from_docs": config.from_docs.model_copy(update={"overwrite": True})})
    assert docs_recipe.plan(forced, runtime, docs).replaces is True
    assert out.read_text(encoding="utf-8") == "kept\n"  # planning replaced nothing

    seen = []
    monkeypatch.setattr("qatune.synth.generator.model_generator",
                        lambda cfg, rt, decoding, batch_size, system=None: seen.append((rt, decoding)) or fake_docs_model)
    docs_recipe.from_docs(forced, docs, runtime)
    assert seen == [(runtime, forced.from_docs.decoding)]
    assert (seen[0][1].temperature, seen[0][1].top_p, seen[0][1].max_new_tokens) == (0.5, 1.0, 384)

    with pytest.raises(DataError, match="nothing to augment"):
        augment_recipe.plan(load_config(None, [f"augment.output={tmp_path / 'aug.jsonl'}"]), runtime)
    assert not (tmp_path / "aug.jsonl").exists()

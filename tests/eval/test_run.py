"""The evaluation stage end to end: compare on the default model, after training, single model, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from qatune.cli import main
from qatune.config import load_config
from qatune.errors import ModelLoadError
from qatune.eval import degenerate, metrics
from qatune.eval.run import ModelSpec, evaluate
from qatune.eval.sets import EvalError
from tests.conftest import tiny_config, write_jsonl


@pytest.fixture(scope="module")
def default_adapter(tmp_path_factory):
    """A small LoRA adapter (random, non-zero) on the default model, saved like a qatune train output."""
    from peft import LoraConfig, get_peft_model

    from qatune.config import ModelConfig
    from qatune.models import load_model, load_tokenizer

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(load_model(ModelConfig(), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    load_tokenizer(ModelConfig()).save_pretrained(folder)
    return folder


def _subset(src, dst, count):
    dst.write_text("".join(src.open(encoding="utf-8").readlines()[:count]), encoding="utf-8")
    return dst


@pytest.mark.slow
def test_compare_base_and_tuned_on_the_default_model(shared_data, default_adapter, tmp_path, capsys):
    domain = _subset(shared_data / "zh_medical_qa" / "test.jsonl", tmp_path / "zh_medical.jsonl", 6)
    general = _subset(shared_data / "general_mcq" / "zh.jsonl", tmp_path / "cmmlu.jsonl", 12)
    out = tmp_path / "eval"
    code = main(["eval", "--compare", "default", str(default_adapter), "--data", str(domain), "--general", str(general),
                 "--out", str(out), "eval.decoding.max_new_tokens=24", "eval.decoding.repetition_penalty=1.1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "General accuracy on cmmlu" in printed and "eval_report.html" in printed

    report = json.loads((out / "eval_report.json").read_text(encoding="utf-8"))
    assert [m["label"] for m in report["models"]] == ["base", "tuned"]
    for label in ("base", "tuned"):
        domain_scores = report["scores"]["zh_medical"][label]
        assert set(metrics.TEXT_METRICS) <= set(domain_scores) and domain_scores["answers"] == 6
        assert 1 < domain_scores["perplexity"] < 1e4 and domain_scores["tokens_per_s"] > 0
        assert domain_scores["latency_p50_s"] <= domain_scores["latency_p95_s"]
        assert 0 <= report["scores"]["cmmlu"][label]["accuracy"] <= 100
        assert report["scores"]["cmmlu"][label]["choice_items"] == 12
    assert report["deltas"]["zh_medical"]["perplexity"] == pytest.approx(
        report["scores"]["zh_medical"]["tuned"]["perplexity"] - report["scores"]["zh_medical"]["base"]["perplexity"])
    assert report["forgetting"]["checked"] and "cmmlu" in report["forgetting"]["sets"]
    intervals = report["intervals"]["zh_medical"]
    assert {"rougeL", "token_f1", "perplexity", "loop_share"} <= set(intervals)
    for found in intervals.values():
        assert found["significant"] == (not found["low"] <= 0 <= found["high"])
    mcq = report["intervals"]["cmmlu"]["accuracy"]
    assert mcq["method"] == "mcnemar" and mcq["delta"] == pytest.approx(report["deltas"]["cmmlu"]["accuracy"])
    assert report["forgetting"]["sets"]["cmmlu"]["interval"] == mcq
    for label in ("base", "tuned"):
        assert {"loop_share", "echo_share", "truncated_share", "wrong_language_share", "distinct_1",
                "distinct_2"} <= set(report["scores"]["zh_medical"][label])
    assert "the tuned model's folder holds no train_report.json" in report["diagnosis"]["notes"][0]
    assert "zh" in report["methods"]["bleu_signatures"] and "tok:zh" in report["methods"]["bleu_signatures"]["zh"]

    side = report["side_by_side"]
    assert len(side) == 6 and any(row["base"] != row["tuned"] for row in side)

    tuned_rows = [json.loads(line) for line in (out / "predictions.tuned.jsonl").open(encoding="utf-8")]
    assert len(tuned_rows) == 6 + 12
    qa = [r for r in tuned_rows if "prediction" in r]
    assert qa[0]["question"] and qa[0]["reference"] and set(qa[0]["scores"]) == set(metrics.TEXT_METRICS)
    assert all(set(r["flags"]) <= set(degenerate.FLAGS) and r["reference_tokens"] > 0 for r in qa)
    assert all(("truncated" in r["flags"]) == (not r["stopped"]) for r in qa)
    assert all(r["new_tokens"] == 24 for r in qa if not r["stopped"])
    with (out / "review_sheet.csv").open(encoding="utf-8-sig", newline="") as f:
        assert len(list(csv.DictReader(f))) == 12

    page = (out / "eval_report.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 2 and "src=\"http" not in page and "<link" not in page  # self-contained
    assert side[0]["question"][:10] in page
    flagged = [row for row in side if row["tuned_flags"]]
    assert page.count("class='degenerate'") == sum(bool(r["base_flags"]) + bool(r["tuned_flags"]) for r in side)
    if flagged:
        assert f"data-flags='{' '.join(flagged[0]['tuned_flags'])}'" in page
    markdown = (out / "eval_report.md").read_text(encoding="utf-8")
    assert "| metric | base | tuned | delta (tuned - base) | 95% interval | verdict |" in markdown
    assert "## What happened" in markdown and "What happened" in page


def test_adapter_for_another_base_is_a_named_error(default_adapter, tiny_model_dir, qa_file, tmp_path):
    config = load_config(None, [f"eval.data={json.dumps([str(qa_file)])}", f"eval.output_dir={tmp_path}"])
    with pytest.raises(ModelLoadError, match="does not fit the model") as info:
        evaluate(config, [ModelSpec("model", str(tiny_model_dir), str(default_adapter))])
    assert "base_model_name_or_path" in info.value.hint
    assert not (tmp_path / "eval_report.json").exists()


def test_single_model_eval_on_a_tiny_model(tiny_model_dir, qa_file, tmp_path):
    mcq = write_jsonl(tmp_path / "mcq.jsonl", [{"question": "2+2=?", "choices": ["4", "5"], "answer": "A"},
                                               {"question": "q", "choices": ["a", "b"], "answer": "Q"}])
    config = load_config(None, [f"eval.data={json.dumps([str(qa_file), str(mcq)])}", "eval.decoding.max_new_tokens=4",
                                "eval.max_samples=5", f"eval.output_dir={tmp_path / 'out'}",
                                'eval.decoding_presets=["repetition_guard"]'])
    result = evaluate(config, [ModelSpec("model", str(tiny_model_dir))])
    report = result.report
    assert report.deltas is None and report.forgetting is None
    assert report.scores["qa"]["model"]["answers"] == 5
    rows = [r for r in result.predictions["model"] if "prediction" in r]
    assert report.scores["qa"]["model"]["empty_answers"] == sum(1 for r in rows if not r["prediction"])
    assert all(r["scores"]["bleu4"] == 0.0 for r in rows if not r["prediction"])  # scored, not dropped
    assert report.scores["mcq"]["model"]["choice_items"] == 1
    assert report.sets[1]["skipped"] == {"bad_answer": 1}
    assert report.sets[1]["skipped_items"][0]["location"].endswith("line 2, field 'answer'")
    assert (tmp_path / "out" / "predictions.model.jsonl").is_file()
    # The named preset answered every question again, measured beside eval.decoding (greedy).
    preset = report.scores["qa"]["model"]["presets"]["repetition_guard"]
    assert {"rougeL", "loop_share", "truncated_share", "distinct_2"} <= set(preset)
    assert all("repetition_guard" in r["presets"] for r in rows)
    assert preset["truncated_share"] == 100 * sum("truncated" in r["presets"]["repetition_guard"]["flags"]
                                                  for r in rows) / len(rows)
    assert "| repetition_guard | model |" in (tmp_path / "out" / "eval_report.md").read_text(encoding="utf-8")


def test_plan_reads_the_sets_and_names_what_it_replaces(tiny_model_dir, qa_file, tmp_path):
    from rich.console import Console

    from qatune.eval import recipe
    from qatune.runtime import Runtime

    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_report.json").write_text("{}")
    config = load_config(None, [f"eval.data={json.dumps([str(qa_file)])}", f"eval.output_dir={out}",
                                "eval.max_samples=3"])
    runtime = Runtime(device="cpu", native_bf16=True, console=Console(quiet=True))
    plan = recipe.plan(config, runtime, [ModelSpec("model", str(tiny_model_dir))])
    assert [(s.name, len(s)) for s in plan.sets] == [("qa", 3)] and not plan.compares
    assert plan.dtype == torch.bfloat16  # model.dtype auto: the runtime's compute dtype
    assert plan.overwrites == ("eval_report.json",) and [p.name for p in out.iterdir()] == ["eval_report.json"]
    with pytest.raises(EvalError, match="nothing to evaluate"):
        recipe.plan(load_config(None, []), runtime, [ModelSpec("model", str(tiny_model_dir))])


def test_tuned_spec_puts_an_adapter_on_the_base(default_adapter, tiny_model_dir):
    from qatune.eval.run import tuned_spec

    assert tuned_spec(str(default_adapter), "default") == ModelSpec("tuned", "default", str(default_adapter))
    assert tuned_spec(str(tiny_model_dir), "default") == ModelSpec("tuned", str(tiny_model_dir))


def test_eval_command_errors(tmp_path, capsys):
    assert main(["eval", "--compare", "a", "b", "--model", "c"]) == 2
    assert "either --compare" in capsys.readouterr().err
    assert main(["eval", "--model", "default", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert main(["eval", "summarize"]) == 2


@pytest.mark.slow
def test_evaluation_after_training(tiny_model_dir, qa_file, tmp_path):
    """Composed by the caller (`qatune train` with eval.after_train): train, then base against tuned on
    the held-out split and eval.general, and the training report points at the evaluation."""
    from qatune.runtime import Runtime
    from qatune.workflow import train_and_evaluate

    mcq = write_jsonl(tmp_path / "mcq.jsonl", [{"question": f"q{i}", "choices": ["yes", "no"], "answer": "A"}
                                               for i in range(4)])
    config = tiny_config(tmp_path, tiny_model_dir, qa_file, "method.name=lora", "train.max_steps=2",
                         "eval.after_train=true", "eval.decoding.max_new_tokens=6",
                         f"eval.general={json.dumps([str(mcq)])}")
    result, evaluation = train_and_evaluate(config, Runtime.detect())
    assert evaluation is not None and evaluation.output_dir == tmp_path / "run" / "eval"
    report = evaluation.report
    assert [s["name"] for s in report.sets] == ["held_out", "mcq"]
    assert report.scores["held_out"]["tuned"]["answers"] == result.report.eval_samples
    assert report.models[1]["adapter"] == str(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "train_report.json").read_text(encoding="utf-8"))
    assert saved["evaluation"]["report"].endswith("eval_report.json") and "held_out" in saved["evaluation"]["deltas"]
    assert saved["evaluation"] == evaluation.headline()
    assert saved["evaluation"]["forgetting_warnings"] == report.forgetting["warnings"]
    # The diagnosis read the training record: 2 steps at the default learning rate barely move an adapter.
    assert len(saved["loss_history"]["train"]) >= 1
    assert "too_few_steps" in [f["check"] for f in report.diagnosis["findings"]]
    assert "Too few optimizer steps for the learning rate" in saved["evaluation"]["diagnosis"]


def test_evaluation_after_training_is_refused_with_the_config(tiny_model_dir, qa_file, tmp_path):
    from qatune.errors import ConfigError

    for overrides, message in ((["train.stage=pt"], "train.stage=pt learns plain text"),
                               (["data.val_size=0"], "nothing to evaluate")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, tiny_model_dir, qa_file, "eval.after_train=true", *overrides)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()

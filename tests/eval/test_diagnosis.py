"""Each diagnosis check fires on a constructed case and stays quiet on a healthy one."""

from __future__ import annotations

from qatune.eval import diagnosis

FALLING = [(s, 3.0 - 0.05 * s) for s in range(1, 21)]  # still falling steeply at the end
FLAT = [(s, 2.0 + (0.01 if s % 2 else -0.01)) for s in range(1, 21)]  # converged


def _row(question: str, prediction: str, reference: str = "参考答案。", flags=()) -> dict:
    return {"set": "zh", "id": question, "question": question, "reference": reference, "prediction": prediction,
            "flags": list(flags)}


def test_loss_still_falling():
    found = diagnosis.loss_still_falling(FALLING, [(0, 3.0), (10, 2.6), (20, 2.2)])
    assert found is not None and found.check == "loss_still_falling" and "num_epochs" in found.fix
    assert diagnosis.loss_still_falling(FLAT, [(0, 3.0), (10, 2.0), (20, 2.0)]) is None
    assert diagnosis.loss_still_falling(FALLING, [(0, 3.0), (10, 2.1), (20, 2.4)]) is None  # eval turned: not this
    assert diagnosis.loss_still_falling(FALLING[:5], []) is None  # too few points to tell


def test_overfitting():
    evals = [(0, 3.0), (5, 2.4), (10, 2.2), (15, 2.35), (20, 2.5)]
    found = diagnosis.overfitting(FALLING, evals)
    assert found is not None and "2.200 at step 10 -> 2.500 at step 20" in found.evidence
    assert diagnosis.overfitting(FALLING, [(0, 3.0), (10, 2.5), (20, 2.2)]) is None
    assert diagnosis.overfitting(FALLING, [(0, 3.0), (10, 2.2), (20, 2.21)]) is None  # within 2%


def test_memorised_answers():
    train = ["幽门螺杆菌阴性表示目前没有感染，不具有传染性，无需治疗，定期复查即可。",
             "高血压患者应低盐饮食，每天食盐少于6克，规律服药，定期监测血压。"]
    copied = [_row(f"问题{i}", train[i % 2]) for i in range(4)]
    found = diagnosis.memorised_answers(copied, train)
    assert found is not None and "4 of 4 tuned answers" in found.evidence
    own = [_row("问题", train[0], reference=train[0])]  # the training answer is this item's own reference
    assert diagnosis.memorised_answers(own * 3, train) is None
    fresh = [_row(f"问题{i}", f"建议您到医院做第{i}项检查，明确病因后对症治疗，注意休息和饮食。") for i in range(4)]
    assert diagnosis.memorised_answers(fresh, train) is None


def test_too_few_steps():
    found = diagnosis.too_few_steps(37, 2e-4, "lora")
    assert found is not None and "37 optimizer steps" in found.evidence and "2e-3 is the measured default" in found.fix
    assert diagnosis.too_few_steps(37, 1e-3, "lora") is None
    assert diagnosis.too_few_steps(300, 2e-4, "lora") is None
    assert diagnosis.too_few_steps(37, 2e-5, "full") is None  # full fine-tuning moves every weight
    # LoRA's update is scaled by alpha / rank: issue 22's tune trial (34 steps at 3.1e-4, alpha = rank) barely moved
    weak = diagnosis.too_few_steps(34, 3.08e-4, "lora", lora_scale=1.0)
    assert weak is not None and "alpha/rank 1" in weak.evidence and "lora_alpha = 2 x" in weak.fix
    assert diagnosis.too_few_steps(34, 3.08e-4, "lora", lora_scale=2.0) is None


def test_base_degenerate_names_a_model_that_fits():
    loops = [_row(f"问题{i}", "范围阴性！" * 8, flags=["loop"]) for i in range(3)] + [_row("问题", "多喝水。")]
    found = diagnosis.base_degenerate({"zh": loops})
    assert found is not None and "3 of 4 base answers on zh (zh)" in found.evidence and "Qwen2.5" in found.fix
    assert diagnosis.base_degenerate({"zh": [_row(f"问题{i}", "多喝水，注意休息。") for i in range(4)]}) is None


def test_template_mismatch():
    marked = [_row(f"q{i}", "答案。<|im_start|>user\n还有吗") for i in range(3)]
    assert diagnosis.template_mismatch(marked, []).check == "template_mismatch"
    run_on = [_row(f"q{i}", "很长的回答", flags=["truncated"]) for i in range(4)]
    stops = [_row(f"q{i}", "短回答") for i in range(4)]
    found = diagnosis.template_mismatch(run_on, stops)
    assert found is not None and "100% of the tuned answers ran to max_new_tokens" in found.evidence
    assert diagnosis.template_mismatch(run_on, run_on) is None  # the base runs on too: not the template
    assert diagnosis.template_mismatch(stops, stops) is None


def test_eval_leakage():
    train = ["幽门螺杆菌阴性是什么意思？需要治疗吗？", "高血压患者饮食上要注意什么？"]
    found = diagnosis.eval_leakage(["幽门螺杆菌阴性是什么意思？需要治疗吗", "感冒发烧怎么办？"], train)
    assert found is not None and "1 of 2 eval questions" in found.evidence
    assert diagnosis.eval_leakage(["感冒发烧怎么办？", "糖尿病能吃水果吗？"], train) is None


def test_diagnose_without_training_record_runs_the_answer_checks():
    loops = [_row(f"问题{i}", "范围阴性！" * 8, flags=["loop"]) for i in range(3)]
    result = diagnosis.diagnose({"base": loops, "tuned": loops}, None)
    assert [f["check"] for f in result["findings"]] == ["base_degenerate"]
    assert "training checks" in result["notes"][0]
    evidence = diagnosis.TrainingEvidence("run", FALLING, [(0, 3.0), (20, 2.2)], 20, 2e-4, "lora")
    checks = [f["check"] for f in diagnosis.diagnose({"base": loops, "tuned": loops}, evidence)["findings"]]
    assert checks == ["base_degenerate", "loss_still_falling", "too_few_steps"]


def test_training_evidence_reads_what_the_folder_holds(tmp_path):
    import json

    assert diagnosis.read_training_evidence(tmp_path) is None  # not a training output
    (tmp_path / "train_report.json").write_text(json.dumps({"method": "lora", "global_step": 12, "loss_history": {
        "train": [[1, 2.5], [2, 2.4]], "eval": [[0, 2.6], [2, 2.5]]}}), encoding="utf-8")
    evidence = diagnosis.read_training_evidence(tmp_path)
    assert evidence.train_loss == [(1, 2.5), (2, 2.4)] and evidence.optimizer_steps == 12
    assert evidence.learning_rate is None and "no " in evidence.notes[0] and "config.yaml" in evidence.notes[0]

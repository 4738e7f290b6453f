"""Preference training on TRL's trainers, inside qatune's one loop: what the stages dpo, kto, orpo and simpo
(one module each beside this one) share.

The data stage hands over conversational rows (`prompt` messages, then `chosen`/`rejected` assistant
turns, or an answer with a label), cleaned, deduplicated and counted like SFT data; TRL
renders them with the training chat template (set on the tokenizer) and masks the prompt, as SFT does.

The reference model, for the stages that have one (`reference_model`: dpo, kto):
- lora / qlora: the same model with its adapter switched off (TRL's `use_adapter(model, None)`). TRL copies
  a PeftModel's adapter into a second one named "ref" because it expects an adapter trained earlier; ours
  is new (LoRA B = 0, so adapter off and adapter on give the same model), so the copy is deleted again and
  nothing is held twice. `stage: dpo` on an SFT run's output merges that adapter into the model first
  (models.load_model), so the reference is the SFT model.
- full / freeze: the model's own log-probabilities of every pair, computed once before the first step
  (TRL's precompute_ref_log_probs): no second copy of the weights either.
orpo and simpo need no reference.

Fast paths: padding-free rows, qatune's chunked loss and lean dropout do not apply here: TRL pads each
batch (its padding-free mode is off since its DPO refactor), computes dpo/kto log-probabilities with its own
chunked ("fused") LM head (orpo/simpo: full logits), and turns dropout off. On a CPU that head scores the
answer positions only, in narrower vocabulary tiles (`compat.trl.labelled_positions_only`: TRL scores every
position there). dpo runs each pair as one row, the prompt once for both answers (`compat.trl.run_prompts_once`;
TRL runs it once per answer, in the policy and in the reference pass). With an adapter, the dpo/kto reference
pass scores log-probabilities alone (`compat.trl.lean_reference_head`: TRL's head also computes the metric
fields the reference pass discards). Length-grouped batches, the mixed-precision cast removal and the CPU
kernel cache apply as in SFT.

TRL 1.x needs Python 3.11; on 3.10 these stages are refused in the plan, before anything is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qatune.errors import DataError
from qatune.train.checkpoints import TrainError
from qatune.train.methods import LORA_METHODS
from qatune.train.stages.base import TrainerInputs, TrainingStage

if TYPE_CHECKING:
    from qatune.config import DataConfig, QatuneConfig
    from qatune.data.records import Conversation, DropLog
    from qatune.data.templates import ChatTemplate
    from qatune.runtime import Runtime
    from qatune.train.fast_paths import FastPaths

PAIRED_COLUMNS = ("prompt", "chosen", "rejected", "length")
TRL_PYTHON = (3, 11)
# Keys of the Trainer's log that report rewards, and the name train_report.json gives each.
REWARD_METRICS = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
                  "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}


@dataclass(frozen=True)
class PreferenceStage(TrainingStage):
    """A TRL preference trainer, its config built from qatune's train and preference sections. Each stage module
    gives its TRL classes, its default beta and `trl_arguments`."""

    columns: tuple[str, ...] = PAIRED_COLUMNS
    section: str | None = "preference"
    learning_rate_advice: Literal["sft", "preference"] | None = "preference"
    default_beta: float = 0.1  # the method's paper / TRL default
    reference_model: bool = False  # scores against a reference model (the base with the adapter switched off)
    prompt_once: bool = False  # its batches are pairs: each prompt is run once for both answers
    trl_classes: tuple[str, str, str] = ("trl", "DPOConfig", "DPOTrainer")  # module, config class, trainer class

    def beta(self, config: "QatuneConfig") -> float:
        return config.preference.beta if config.preference.beta is not None else self.default_beta

    def trl_arguments(self, config: "QatuneConfig", precompute_reference: bool) -> dict[str, Any]:
        """The TRL config fields of this stage from the preference section (the train section gives the rest)."""
        return {"beta": self.beta(config)}

    def check_records(self, convs: list["Conversation"]) -> None:
        for conv in convs:
            if conv.rejected is None:
                raise DataError(f"train.stage={self.name} needs chosen and rejected answers, and this record has "
                                "none", conv.location, hint="give {question|prompt|messages, chosen, rejected} "
                                "records; `qatune data feedback` makes them from a scored review sheet")

    def make_rows(self, convs: list["Conversation"], tokenizer: Any, template: "ChatTemplate", data: "DataConfig",
                  log: "DropLog") -> list[dict[str, Any]]:
        from qatune.data.samples import preference_rows

        return preference_rows(convs, tokenizer, template, data, log)

    def check(self, config: "QatuneConfig", runtime: "Runtime") -> None:
        if sys.version_info < TRL_PYTHON or importlib.util.find_spec("trl") is None:
            have = "Python %d.%d" % sys.version_info[:2]
            raise TrainError(f"train.stage={self.name} runs on TRL 1.x, which needs Python 3.11 or newer "
                             f"({have} here{'' if importlib.util.find_spec('trl') else ', and trl is not installed'})",
                             hint="use Python >= 3.11 and pip install 'qatune[preference]'")
        if config.method.name == "prefix":
            raise TrainError(f"method prefix with train.stage={self.name}: the preference stages run lora, qlora, "
                             "full and freeze (prefix tuning with TRL's preference trainers is not verified here)",
                             hint="use method.name=lora (or qlora, full, freeze)")

    def library_patches(self, runtime: "Runtime") -> AbstractContextManager[None]:
        from qatune.compat.trl import labelled_positions_only

        return labelled_positions_only() if runtime.device == "cpu" else nullcontext()

    def build_trainer(self, inputs: TrainerInputs) -> tuple[Any, "FastPaths"]:
        import torch

        from qatune.compat.trl import lean_reference_head, run_prompts_once
        from qatune.train.arguments import training_arguments
        from qatune.train.fast_paths import FastPaths

        config, model, tokenizer = inputs.config, inputs.model, inputs.tokenizer
        tokenizer.chat_template = inputs.template.source  # TRL renders the rows with the tokenizer's own template
        trainer_class, arguments_class = self._trl_classes()
        adapter = config.method.name in LORA_METHODS
        args = training_arguments(
            config, inputs.precision, inputs.runtime, len(inputs.train_set), inputs.eval_set is not None,
            getattr(model, "_no_split_modules", None) or [], arguments_class=arguments_class,
            activation_checkpointing=False,  # the method applies train.gradient_checkpointing (TRL defaults it on)
            max_length=config.data.max_length,
            **self.trl_arguments(config, precompute_reference=not adapter))
        trainer = trainer_class(model=model, args=args, train_dataset=inputs.train_set,
                                eval_dataset=inputs.eval_set, processing_class=tokenizer, callbacks=inputs.callbacks)
        if adapter and "ref" in getattr(model, "peft_config", {}):
            model.delete_adapter("ref")  # a copy of the new adapter: the adapter switched off is the same reference
        fused_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # TRL's fused head
        patches = []
        if adapter and self.reference_model:  # the reference pass (adapters off) scores log-probs alone
            patches.append(lean_reference_head(fused_model))
        if self.prompt_once:
            patches.append(run_prompts_once(fused_model))
        if config.method.name == "qlora":
            # TRL casts QLoRA adapters to bf16 (the paper's choice); qatune keeps adapter weights fp32 as in sft
            # (bf16 updates round away small steps, and a CPU without native bf16 emulates it ~100x slower).
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.float32)
        reference = ("none" if not self.reference_model else "the base with the adapter switched off" if adapter
                     else "log-probabilities precomputed before training")
        fast = FastPaths(collator=None, loss=None, padding_free_on=None, lean_dropout=False,
                         mixed_precision=inputs.dtype != torch.float32,
                         summary=f"Fast paths: padded batches ({self.name}: TRL's collator"
                                 f"{'; each prompt run once for both answers' if self.prompt_once else ''}); "
                                 f"reference model: {reference}", model_patches=tuple(patches))
        return trainer, fast

    def report(self, log_history: list[dict[str, Any]]) -> dict[str, Any]:
        """Rewards of every evaluation (chosen vs rejected: accuracy, margin), first and last, and of training."""
        evaluations = [{"step": entry["step"], **{name: entry[f"eval_{key}"] for key, name in REWARD_METRICS.items()
                                                  if f"eval_{key}" in entry}}
                       for entry in log_history if "eval_loss" in entry]
        train = [entry for entry in log_history if "loss" in entry]
        out: dict[str, Any] = {"preference_evaluations": evaluations}
        for label, entry in (("initial", evaluations[0] if evaluations and evaluations[0]["step"] == 0 else None),
                             ("final", evaluations[-1] if evaluations else None)):
            for name in REWARD_METRICS.values():
                if entry and name in entry:
                    out[f"{label}_eval_{name}"] = entry[name]
        if train:
            out.update({f"final_train_{name}": train[-1][key] for key, name in REWARD_METRICS.items()
                        if key in train[-1]})
        return out

    def plot_series(self, log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
        series = {}
        for key, label in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")):
            series[f"eval {label}"] = [(e["step"], e[f"eval_{key}"]) for e in log_history if f"eval_{key}" in e]
        return series

    def _trl_classes(self) -> tuple[type, type]:
        """qatune's subclass of the stage's TRL trainer (seeded length-grouped batches, token counts), and its
        config class."""
        import warnings

        from qatune.compat.trl import preference_trainer

        module, config_class, trainer_class = self.trl_classes
        with warnings.catch_warnings():
            # TRL warns on import that its experimental trainers may change; the version bound in pyproject covers it.
            warnings.simplefilter("ignore")
            trl = importlib.import_module(module)
        return preference_trainer(getattr(trl, trainer_class)), getattr(trl, config_class)

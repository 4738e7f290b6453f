"""`train.stage: pt`: continued pre-training on plain text (`text` records, .txt/.md files). No chat template:
documents are joined with eos and packed into blocks of data.max_length, every token labelled (as
LLaMA-Factory's pt stage). It answers no questions: its eval loss is the held-out perplexity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qatune.errors import DataError, Problem, TemplateError
from qatune.train.stages.base import TrainingStage

if TYPE_CHECKING:
    from qatune.config import DataConfig, QatuneConfig
    from qatune.data.records import Conversation, DropLog
    from qatune.data.templates import ChatTemplate


class PretrainingStage(TrainingStage):
    def validate(self, config: "QatuneConfig") -> list[Problem]:
        if config.eval.after_train:
            return [Problem("eval.after_train", "answers questions, and train.stage=pt learns plain text (its eval "
                            "loss is the held-out perplexity)", "set eval.after_train=false; evaluate the sft stage")]
        return []

    def template(self, tokenizer: Any, data_cfg: "DataConfig") -> "ChatTemplate":
        """No template is rendered (a base model may have none): documents end with eos, which is also where
        generation stops. The model's own template, if any, is kept for a later sft stage; a named one is used."""
        from qatune.data.templates import ChatTemplate, resolve_template

        if data_cfg.template != "auto":
            return resolve_template(tokenizer, data_cfg.template)
        if tokenizer.eos_token is None:
            raise TemplateError(f"the tokenizer of {tokenizer.name_or_path!r} has no eos token to end documents with",
                                hint="continued pre-training (train.stage=pt) needs a tokenizer with an eos_token")
        source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        return ChatTemplate("none (pt)", source, tokenizer.eos_token, tokenizer.eos_token_id)

    def check_records(self, convs: list["Conversation"]) -> None:
        """Continued pre-training reads documents, not conversations: a Q&A record there is a mistake."""
        for conv in convs:
            if not conv.is_text:
                raise DataError("train.stage=pt trains on plain text, and this record is a conversation",
                                conv.location, hint="give pt sources of format text ({\"text\": ...} records, .txt "
                                "or .md files), or set train.stage=sft")

    def make_rows(self, convs: list["Conversation"], tokenizer: Any, template: "ChatTemplate", data: "DataConfig",
                  log: "DropLog") -> list[dict[str, Any]]:
        from qatune.data.samples import packed_rows

        return packed_rows(convs, tokenizer, data.max_length)


PLUGIN = PretrainingStage("pt", answers_questions=False, learning_rate_advice=None)

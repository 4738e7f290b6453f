"""The request bodies of the API routes; unknown fields are ignored, as OpenAI clients send many. Every string
is `Text` or `Name` (`qatune.text_input`): invalid Unicode is a 422 naming the field, never a 500 in a tokenizer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qatune.text_input import Name, Text

SEED_RANGE = (-2**63, 2**63 - 1)  # what torch.Generator.manual_seed and vLLM both take


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Decoding(_Body):
    """What a request may say about its answer; a request that says nothing gets serve.decoding."""

    model: Name | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = Field(None, description="up to 4 non-empty strings")
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    repetition_penalty: float | None = Field(None, ge=1, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    stream_options: dict[str, Any] | None = None


class ChatRequest(Decoding):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Decoding):
    prompt: Text


class AnswerRequest(_Body):
    question: Text = Field(min_length=1)
    model: Name | None = None

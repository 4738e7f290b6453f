"""What every section shares: strictness, secret fields, and the decoding sub-section."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# A field whose name looks like a credential is secret even where its schema forgot to say so.
_SECRET_NAME = re.compile(r"(^|_)(api_key|apikey|password|passwd|secret|access_token|auth_token|hf_token)$")


def secret_field(default: Any, description: str) -> Any:
    """A field that holds a credential: `QatuneConfig.to_yaml()` and `file_dump()` never write its value
    (config.yaml, reports and dumps list it as withheld instead)."""
    return Field(default, description=description + " Secret: never written to config.yaml, reports or dumps.",
                 json_schema_extra={"secret": True})


def is_secret(name: str, info: FieldInfo) -> bool:
    """Whether a field holds a credential: marked with `secret_field`, or named like one (`api_key`, `*_password`...)."""
    extra = info.json_schema_extra
    return (isinstance(extra, dict) and extra.get("secret") is True) or bool(_SECRET_NAME.search(name))


class DecodingConfig(Section):
    """How answers are generated: length and sampling."""

    max_new_tokens: int = Field(256, ge=1, description="Longest generated answer (tokens).")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share (with temperature above 0).")
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="Above 1 discourages repeating tokens (1.1-1.3 helps small models); 1 is off."
    )


def decoding_section(name: str, used_by: str, **defaults: Any) -> type[DecodingConfig]:
    """A DecodingConfig whose unset keys take this section's defaults: `serve.decoding: {temperature: 0}`
    must keep serve's top_p, not fall back to DecodingConfig's."""
    fields = {key: (info.annotation, FieldInfo.merge_field_infos(info, default=defaults[key]))
              for key, info in DecodingConfig.model_fields.items() if key in defaults}
    unknown = set(defaults) - set(DecodingConfig.model_fields)
    if unknown:
        raise TypeError(f"decoding_section({name!r}): unknown keys {sorted(unknown)}")
    model = create_model(name, __base__=DecodingConfig, __module__=__name__, **fields)  # type: ignore[call-overload]
    model.__doc__ = f"How answers are generated {used_by}."
    return model

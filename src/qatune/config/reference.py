"""The config reference (docs/config.md), generated from the schema."""

from __future__ import annotations

from pydantic import BaseModel

from qatune.config.root import QatuneConfig
from qatune.config.schema import inner_model, type_name


def config_reference() -> str:
    """Markdown reference of every key, generated from the schema (written to docs/config.md)."""
    out = [
        "# qatune config reference",
        "",
        "Generated from `src/qatune/config/` by `qatune config docs`; do not edit by hand.",
        "A config is a YAML file with these sections; any key can be overridden on the command line as",
        "`section.key=value` (values are read as YAML: `3`, `true`, `[a, b]`). Unknown keys are errors.",
        "",
    ]

    # Each section model once, under every key that holds it (the three source lists share one table).
    holders: dict[type[BaseModel], list[str]] = {}

    def collect(model: type[BaseModel], prefix: str) -> None:
        holders.setdefault(model, []).append(prefix)
        for name, info in model.model_fields.items():
            inner = inner_model(info.annotation)
            if inner is not None:
                collect(inner, f"{prefix}.{name}")

    for name, info in QatuneConfig.model_fields.items():
        collect(inner_model(info.annotation), name)
    for model, prefixes in holders.items():
        level = min(prefixes[0].count(".") + 2, 4)
        out += [f"{'#' * level} " + ", ".join(f"`{p}`" for p in prefixes), "", (model.__doc__ or "").strip(), "",
                "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for name, info in model.model_fields.items():
            if info.is_required():
                default = "required"
            elif inner_model(info.annotation) is not None:
                default = "see below" if not isinstance(info.get_default(call_default_factory=True), list) else "`[]`"
            else:
                default = f"`{info.get_default(call_default_factory=True)!r}`"
            kind = type_name(info.annotation).replace("|", "/")
            out.append(f"| `{name}` | {kind} | {default} | {info.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"

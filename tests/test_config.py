"""Strict config: every problem reported at once, with key, line, expected type and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from qatune.config import QatuneConfig, config_reference, load_config
from qatune.errors import ConfigError
from tests.conftest import REPO


def test_defaults_and_shorthands(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: default\ndata:\n  sources: [a.jsonl, {path: b.csv, format: qa}]\n")
    cfg = load_config(cfg_file)
    assert cfg.model.name_or_path == "default"
    assert [s.path for s in cfg.data.sources] == ["a.jsonl", "b.csv"]
    assert cfg.data.sources[1].format == "qa"
    assert cfg.method.name == "lora" and cfg.serve.host == "127.0.0.1"


def test_overrides_are_read_as_yaml_and_reach_nested_keys(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: default\ndata:\n  sources: [a.jsonl]\n")
    cfg = load_config(cfg_file, ["data.max_length=256", "data.clean.near_dedup=false", "model.dtype=bfloat16",
                                 "data.sources.0.format=alpaca", "data.task_tag=[QA]"])
    assert cfg.data.max_length == 256
    assert cfg.data.clean.near_dedup is False
    assert cfg.model.dtype == "bfloat16" and cfg.model.name_or_path == "default"
    assert cfg.data.sources[0].format == "alpaca"
    assert cfg.data.task_tag == "[QA]"  # a text field keeps the text, not a YAML list


def test_every_problem_is_reported_with_key_line_type_and_suggestion(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "data:\n"
        "  max_lenght: 512\n"        # line 2: misspelt
        "  min_answer_length: 3\n"   # line 3: belongs under data.clean
        "  val_size: lots\n"         # line 4: wrong type
        "trian:\n"                   # line 5: misspelt section
        "  seed: 1\n"
        "method:\n"
        "  name: lorra\n"            # line 8: not an allowed value
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, ["serve.port=http"])
    text = str(info.value)
    assert "6 problems" in text and str(cfg_file) in text
    assert "data.max_lenght (line 2): unknown key; did you mean 'max_length'?" in text
    assert "data.min_answer_length (line 3): unknown key; did you mean 'clean.min_answer_length'?" in text
    assert "data.val_size (line 4)" in text and "expected number" in text and "'lots'" in text
    assert "trian (line 5): unknown key; did you mean 'train'?" in text
    assert "method.name (line 8)" in text and "'lorra'" in text and "one of 'lora'" in text
    assert "serve.port" in text and "expected integer" in text


def test_bad_override_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["data.max_length"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_validators_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="general_sources is empty"):
        load_config(None, ["data.mix_ratio=7:3"])
    with pytest.raises(ConfigError, match="expected 'domain:general'"):
        load_config(None, ["data.mix_ratio=seven", "data.general_sources=[g.jsonl]"])
    with pytest.raises(ConfigError, match="one of chatml, llama3, alpaca, default"):
        load_config(None, ["data.template=vicuna"])
    cfg = load_config(None, ["data.mix_ratio=7:3", "data.general_sources=[g.jsonl]"])
    assert cfg.data.general_share() == pytest.approx(0.3)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_validates(path: Path) -> None:
    assert isinstance(load_config(path), QatuneConfig)


def test_config_reference_is_generated_and_current() -> None:
    reference = config_reference()
    for key in ("near_dup_threshold", "on_error", "train_on_prompt", "lora_rank", "api_key"):
        assert f"`{key}`" in reference
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == reference, (
        "docs/config.md is stale: run `make docs`"
    )


def test_secrets_never_reach_the_yaml_or_a_file_dump(tmp_path: Path) -> None:
    """serve.api_key (and any field marked secret) is withheld from to_yaml() and file_dump(), named in a
    comment; a URL password is masked; the config in memory keeps both; the YAML loads back."""
    key, password = "sk-config-9d2b7e", "hunter2pw"
    cfg = load_config(None, [f"serve.api_key={key}", f"tune.storage=postgresql://bob:{password}@db:5432/optuna"])
    text = cfg.to_yaml()
    assert key not in text and password not in text and str(cfg.file_dump()).count(key) == 0
    assert text.splitlines()[0].startswith("# Secrets withheld") and "serve.api_key" in text.splitlines()[0]
    assert "api_key" not in cfg.file_dump()["serve"] and cfg.withheld_secrets() == ["serve.api_key"]
    assert cfg.file_dump()["tune"]["storage"] == "postgresql://bob:***@db:5432/optuna"
    assert cfg.serve.api_key == key and cfg.model_dump()["serve"]["api_key"] == key  # memory keeps it
    path = tmp_path / "saved.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path).serve.api_key is None
    assert not load_config(None).to_yaml().startswith("#")  # nothing set, nothing to name


def test_a_field_marked_secret_or_named_like_one_is_secret() -> None:
    from pydantic import Field

    from qatune.config.base import Section, is_secret, secret_field
    from qatune.config.root import _withhold

    class Endpoint(Section):
        url: str = Field("http://x", description="u")
        credential: str | None = secret_field(None, "a key under any name")
        hf_token: str | None = Field(None, description="named like a secret")
        max_new_tokens: int = Field(8, description="not a secret")

    fields = Endpoint.model_fields
    assert is_secret("credential", fields["credential"]) and is_secret("hf_token", fields["hf_token"])
    assert not is_secret("max_new_tokens", fields["max_new_tokens"]) and not is_secret("url", fields["url"])
    model = Endpoint(credential="c-123", hf_token="t-456")
    withheld: list[str] = []
    dumped = _withhold(model, model.model_dump(mode="json"), "x.", withheld)
    assert dumped == {"url": "http://x", "max_new_tokens": 8} and withheld == ["x.credential", "x.hf_token"]
    assert "Secret: never written" in fields["credential"].description  # the config reference says so

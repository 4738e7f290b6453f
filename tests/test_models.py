"""The one reader of adapter folders."""

from __future__ import annotations

import json

import pytest

from qatune.errors import ModelLoadError
from qatune.models import read_adapter


def test_read_adapter_says_what_the_folder_holds(tmp_path) -> None:
    assert read_adapter(tmp_path) is None  # a model folder, or anything without adapter_config.json
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "base/dir", "r": 8}))
    info = read_adapter(tmp_path)
    assert (info.kind, info.base, info.rank, info.is_lora, info.has_tokenizer) == ("LORA", "base/dir", 8, True, False)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert read_adapter(tmp_path).has_tokenizer
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    prefix = read_adapter(tmp_path)
    assert (prefix.is_lora, prefix.base, prefix.rank) == (False, None, None)


def test_a_damaged_adapter_config_names_the_file(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="adapter_config.json is not readable JSON"):
        read_adapter(tmp_path)

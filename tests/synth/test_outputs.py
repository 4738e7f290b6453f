"""Issue 19, item 5 for from-docs and augment: the dataset and its sidecars (.report.json,
.dropped.jsonl) are one output, replaced only with --force and never when it is one of the inputs;
each file is written whole."""

from __future__ import annotations

import pytest

from qatune.config import load_config
from qatune.errors import DataError
from qatune.runtime import Runtime
from qatune.synth import augment as augment_recipe
from qatune.synth import from_docs as docs_recipe
from qatune.synth.from_docs import from_docs
from tests.conftest import write_jsonl
from tests.synth.test_synth import fake_docs_model, write_docs


def forced(config, section: str):
    return config.model_copy(update={section: getattr(config, section).model_copy(update={"overwrite": True})})


@pytest.mark.parametrize("sidecar", [".report.json", ".dropped.jsonl"])
def test_a_sidecar_file_alone_is_protected(tmp_path, sidecar) -> None:
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "qa.jsonl"
    users = out.with_suffix(sidecar)
    users.write_text("the user's own file\n", encoding="utf-8")
    config = load_config(None, [f"from_docs.output={out}"])
    with pytest.raises(DataError, match="already exists") as info:
        from_docs(config, docs, generator=fake_docs_model)
    assert users.name in str(info.value) and "from_docs.overwrite" in str(info.value)
    assert users.read_text(encoding="utf-8") == "the user's own file\n" and not out.exists()

    result = from_docs(forced(config, "from_docs"), docs, generator=fake_docs_model)  # --force: replaced
    assert users.read_text(encoding="utf-8") != "the user's own file\n" and result.records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "qa.dropped.jsonl", "qa.jsonl", "qa.report.json"]


def test_an_input_is_never_the_output_even_with_force(tmp_path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is the capital of France?", "answer": "Paris."}])
    before = data.read_bytes()
    for output in (data, tmp_path / "qa.jsonl"):
        config = forced(load_config(None, [f"data.sources=[{data}]", f"augment.output={output}"]), "augment")
        with pytest.raises(DataError, match="would replace an input"):
            augment_recipe.plan(config, Runtime())
    docs = write_docs(tmp_path / "docs")
    config = forced(load_config(None, [f"from_docs.output={data}", f"from_docs.against=[{data}]"]), "from_docs")
    with pytest.raises(DataError, match="would replace an input"):
        docs_recipe.plan(config, Runtime(), docs)
    assert data.read_bytes() == before


def test_a_failed_write_keeps_the_earlier_output(tmp_path, monkeypatch) -> None:
    docs = write_docs(tmp_path / "docs")
    out = tmp_path / "qa.jsonl"
    config = forced(load_config(None, [f"from_docs.output={out}"]), "from_docs")
    from_docs(config, docs, generator=fake_docs_model)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    from pathlib import Path

    real_write = Path.write_text

    def disk_full_half_way(self, text, *args, **kwargs):
        real_write(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", disk_full_half_way)
    with pytest.raises(OSError, match="disk full"):
        from_docs(config, docs, generator=fake_docs_model)
    journal = out.with_suffix(".partial.jsonl")  # the generated outputs, kept for the next run to resume from
    assert len(journal.read_text(encoding="utf-8").splitlines()) == 4
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p != journal}
    assert after == before  # no half file, no temp

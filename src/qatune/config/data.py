"""The `data` section: sources, cleaning, templates, splits."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from qatune import plugins
from qatune.config.base import Section

SOURCE_FORMATS = ("auto", *plugins.names("format"))
NAMED_TEMPLATES = ("chatml", "llama3", "alpaca", "default", "gemma")


class SharegptTags(Section):
    """How a sharegpt file names roles and content (LLaMA-Factory's `tags`)."""

    role_tag: str = Field("from", description="Key of a message that holds its role.")
    content_tag: str = Field("value", description="Key of a message that holds its text.")
    user_tag: str = Field("human", description="Role value of the user.")
    assistant_tag: str = Field("gpt", description="Role value of the assistant.")
    system_tag: str = Field("system", description="Role value of a system prompt.")
    observation_tag: str = Field("observation", description="Role value of a tool result (trained as input).")
    function_tag: str = Field("function_call", description="Role value of a tool call (trained as output).")


class SourceConfig(Section):
    """One dataset: a file or folder, or a named entry of a LLaMA-Factory `dataset_info.json`."""

    path: str = Field(
        description="A .json/.jsonl/.csv/.tsv/.parquet file, a folder of them, or (with `dataset`) a "
        "LLaMA-Factory dataset_info.json or the folder holding it. A plain string stands for this key."
    )
    dataset: str | None = Field(
        None, description="Name(s) in the LLaMA-Factory registry at `path`, comma-separated for several."
    )
    format: Literal[SOURCE_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="Record format; `auto` detects it from the first record's keys."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map from the format's field name to the column name in your file, e.g. "
        "`{question: ask, answer: reply}`.",
    )
    tags: SharegptTags = Field(default_factory=SharegptTags, description="Role and content keys for sharegpt.")
    name: str | None = Field(None, description="Label in the report; defaults to the file or dataset name.")
    max_records: int | None = Field(None, ge=1, description="Read at most this many records of each file: its first ones.")




def _source_list(value: Any) -> Any:
    """A list of sources, where one plain string stands for a source's path and a lone source for a list."""
    items = value if isinstance(value, list) else [value]
    return [{"path": item} if isinstance(item, str) else item for item in items]


SourceList = Annotated[list[SourceConfig], BeforeValidator(_source_list)]


class CleanConfig(Section):
    """Normalisation and filters. Every dropped record is counted with its reason."""

    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC",
        description="Unicode normalisation. NFC keeps Chinese full-width punctuation (，。？); NFKC would turn it "
        "into ASCII and teach the model to answer with half-width punctuation.",
    )
    min_question_length: int = Field(
        2, ge=0, description="Drop records whose user text is shorter (words; each CJK character counts as one)."
    )
    min_answer_length: int = Field(
        2, ge=0, description="Drop records whose assistant text is shorter (words; each CJK character counts as one)."
    )
    dedup: bool = Field(True, description="Drop exact duplicate conversations (after normalisation).")
    near_dedup: bool = Field(True, description="Drop near-duplicate conversations (MinHash LSH on character n-grams).")
    near_dup_threshold: float = Field(
        0.85, gt=0, lt=1, description="Estimated Jaccard similarity at or above which two texts are near-duplicates."
    )
    ngram: int = Field(5, ge=1, description="Character n-gram size for near-duplicate shingles (works for Chinese).")
    num_perm: int = Field(128, ge=16, description="MinHash permutations: more is more exact and slower.")
    leakage: bool = Field(
        True, description="Remove train records whose question near-duplicates an eval question, and report them."
    )


class DataConfig(Section):
    """Where the data comes from and how it becomes training samples."""

    sources: SourceList = Field(default_factory=list, description="Domain datasets for training.")
    eval_sources: SourceList = Field(
        default_factory=list, description="Held-out evaluation datasets. Without them, `val_size` is split off."
    )
    general_sources: SourceList = Field(
        default_factory=list, description="General datasets mixed into train at `mix_ratio` (against forgetting)."
    )
    mix_ratio: str | None = Field(
        None, description="Domain:general ratio of train records, e.g. `7:3`. Needs `general_sources`."
    )
    val_size: float = Field(
        0.1, ge=0, description="Validation share (0-1) or count (>= 1) split off the domain data; 0 for none."
    )
    seed: int = Field(42, description="Seed of the split, the mixing and the shuffles.")
    template: str = Field(
        "auto",
        description="`auto` uses the model's own chat template; for base models name one of "
        f"{', '.join(NAMED_TEMPLATES)}.",
    )
    system: str | None = Field(None, description="System prompt for records that have none.")
    task_tag: str | None = Field(None, description="Prefix for domain questions, e.g. `[QA]` (not general data).")
    max_length: int = Field(
        1024, ge=16, description="Maximum tokens per sample; longer samples are truncated (or dropped when not even "
        "a quarter of it is left for the first answer). Left unset, it is chosen from the data at prepare time: the "
        "99th percentile of the samples' token lengths rounded up to a multiple of 64 (128-4096; 1024 for plain "
        "texts), printed with the share of samples it cuts and kept in data_report.json; a value you set is used "
        "as given.",
    )
    train_on_prompt: bool = Field(False, description="Also compute loss on system/user tokens.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="On a bad record: `raise` stops with its location; `skip` drops and counts it."
    )
    encoding: str = Field("utf-8", description="Text encoding of the files, e.g. `gb18030` for old Chinese CSVs.")
    max_record_bytes: int = Field(
        16 << 20,
        ge=1024,
        description="Largest record read, in bytes as stored (a JSON/JSONL record, a CSV or Parquet row; 16 MiB by "
        "default): a larger one is an error naming its file and record, or with `on_error: skip` a counted drop. "
        "It is read past without being held, so one huge record cannot exhaust memory.",
    )
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Normalisation and filters.")
    output_dir: str = Field(
        "outputs/data", description="Where `qatune data prepare` writes the dataset and report. A dataset prepared "
        "from the same inputs is reused; a different one is replaced only in a folder qatune prepared, never in a "
        "folder with other files.",
    )

    @field_validator("mix_ratio")
    @classmethod
    def _check_ratio(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\s*\d+(\.\d+)?\s*:\s*\d+(\.\d+)?\s*", v):
            raise ValueError(f"expected 'domain:general' such as '7:3', got {v!r}")
        return v

    @field_validator("template")
    @classmethod
    def _check_template(cls, v: str) -> str:
        if v != "auto" and v not in NAMED_TEMPLATES:
            raise ValueError(f"expected 'auto' or one of {', '.join(NAMED_TEMPLATES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_mix(self) -> DataConfig:
        if self.mix_ratio and not self.general_sources:
            raise ValueError("mix_ratio is set but general_sources is empty: add general_sources or drop mix_ratio")
        return self

    def general_share(self) -> float:
        """Share of general records in the mixed train set (0.3 for `7:3`)."""
        if not self.mix_ratio:
            return 0.0
        domain, general = (float(x) for x in self.mix_ratio.split(":"))
        return general / (domain + general)

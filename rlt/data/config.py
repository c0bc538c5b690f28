"""The data concern's settings: which dataset, and how its rows and texts are tagged."""
from __future__ import annotations

import dataclasses
from dataclasses import field

from rlt.errors import ConfigError


@dataclasses.dataclass
class FormatConfig:
    """How rows are read and teacher/student texts are tagged (README "Data formats")."""

    data_format: str = field(default="auto", metadata={
        "help": "auto (from the columns: conversations -> bespoke_stratos, question/prompt + solution -> custom) "
                "or a format name in rlt/data/formats.py (bespoke_stratos, custom, custom_r1)"})
    student_system_prompt: str | None = field(default=None, metadata={
        "help": "student system prompt for rows without a `system` (a row's own `system` is kept; null: the "
                "format's default)"})
    teacher_system_prompt: str | None = field(default=None, metadata={
        "help": "teacher system prompt (null: the format's default)"})

    def __post_init__(self):
        from rlt.data.formats import FORMATS

        if self.data_format != "auto" and self.data_format not in FORMATS:
            raise ConfigError(f"data_format={self.data_format!r}: choose auto or one of {sorted(FORMATS)}")


@dataclasses.dataclass
class DataConfig:
    """Which questions (with solutions and traces) a run reads."""

    dataset_id_or_path: str | None = field(default=None, metadata={
        "help": "hub id, local .jsonl/.json/.parquet/.csv file or directory, or rlt-countdown:N:SEED (embedded)"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub or directory dataset"})
    dataset_config: str | None = field(default=None, metadata={
        "help": "configuration (subset) of a hub dataset that has several, e.g. main for openai/gsm8k"})
    drop_bad_rows: bool = field(default=False, metadata={
        "help": "skip unparseable rows (their count is logged) instead of stopping at the first"})
    max_samples: int | None = field(default=None, metadata={"help": "use only the first N rows (null: all)"})
    max_prompt_length: int = field(default=16384, metadata={
        "help": "longest prompt in tokens; longer ones are dropped when the data is built (count logged)"})

    def __post_init__(self):
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples={self.max_samples} must be >= 1 (or null for all rows)")
        if self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} must be >= 1")

    def require_dataset(self) -> str:
        if not self.dataset_id_or_path:
            raise ConfigError("dataset_id_or_path is required (a file, directory, hub id or rlt-countdown:N:SEED)")
        return self.dataset_id_or_path

"""Loading question/solution datasets from local files or the hub."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from rlt.data.examples import Example, parse_rows
from rlt.data.formats import DataFormat

logger = logging.getLogger(__name__)

COUNTDOWN_RE = re.compile(r"^rlt-countdown:(\d+):(\d+)$")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(dataset_id_or_path: str, split: str = "train"):
    """Rows of a dataset as a `datasets.Dataset`: ``rlt-countdown:N:SEED``
    (embedded Countdown, Stratos schema), a local jsonl/json/parquet/csv file,
    a directory saved with `save_to_disk`, a directory of data files, or a hub id."""
    import datasets

    m = COUNTDOWN_RE.match(str(dataset_id_or_path))
    if m:
        from rlt.data.countdown import generate_rows, to_stratos

        rows = generate_rows(int(m.group(1)), seed=int(m.group(2)))
        return datasets.Dataset.from_list([to_stratos(r) for r in rows])
    path = Path(dataset_id_or_path)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"dataset_id_or_path={dataset_id_or_path}: unsupported file type {path.suffix!r}; "
                             f"use one of {sorted(_FILE_BUILDERS)}")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(str(path), split=split)
    if path.suffix in _FILE_BUILDERS or str(dataset_id_or_path).startswith(("/", ".")):
        raise FileNotFoundError(f"dataset_id_or_path={dataset_id_or_path}: no such file or directory")
    return datasets.load_dataset(str(dataset_id_or_path), split=split)


def load_examples(dataset_id_or_path: str, fmt: DataFormat, split: str = "train",
                  drop_bad_rows: bool = False, max_samples: int | None = None) -> list[Example]:
    """Load and parse a dataset into examples (errors name the source and row)."""
    ds = load_rows(dataset_id_or_path, split)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    examples = parse_rows(ds, fmt, source=str(dataset_id_or_path), drop_bad_rows=drop_bad_rows)
    if not examples:
        raise ValueError(f"{dataset_id_or_path}: no usable rows")
    logger.info("loaded %d examples from %s (%s format)", len(examples), dataset_id_or_path, fmt.name)
    return examples

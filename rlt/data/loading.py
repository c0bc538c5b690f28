"""Loading question/solution datasets from local files or the hub."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from rlt.data.examples import Example, RowError, parse_rows
from rlt.data.formats import DataFormat, resolve_format
from rlt.errors import ConfigError

logger = logging.getLogger(__name__)

COUNTDOWN_RE = re.compile(r"^rlt-countdown:(\d+):(\d+)$")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_jsonl(path: str | Path, skip_bad: bool = False, bad: list[int] | None = None):
    """(line number, row) for each non-empty line of a JSON-lines file.

    A line that is not UTF-8, not JSON or not a JSON object raises :class:`RowError` naming the file and
    line, or with ``skip_bad`` is skipped and its number appended to ``bad``.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except UnicodeDecodeError as e:
                err = f"not valid UTF-8 (byte {e.start})"
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                err = str(e) if "not an object" in str(e) else f"not valid JSON ({e})"
            else:
                yield lineno, row
                continue
            if not skip_bad:
                raise RowError(f"{path}, line {lineno}: {err}")
            if bad is not None:
                bad.append(lineno)


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
    if str(dataset_id_or_path).startswith("rlt-arith:"):  # embedded running-sum task (rlt/data/arithmetic.py)
        from rlt.data.arithmetic import stratos_rows_of_id

        return datasets.Dataset.from_list(stratos_rows_of_id(str(dataset_id_or_path)))
    path = Path(dataset_id_or_path)
    if path.is_file() and path.suffix == ".jsonl":  # read here: errors name the line
        rows = [row for _, row in read_jsonl(path)]
        if not rows:
            raise RowError(f"{path}: no rows")
        return datasets.Dataset.from_list(rows)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ConfigError(f"dataset_id_or_path={dataset_id_or_path}: unsupported file type {path.suffix!r}; "
                             f"use one of {sorted(_FILE_BUILDERS)}")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(str(path), split=split)
    if path.suffix in _FILE_BUILDERS or str(dataset_id_or_path).startswith(("/", ".")):
        raise ConfigError(f"dataset_id_or_path={dataset_id_or_path}: no such file or directory")
    return datasets.load_dataset(str(dataset_id_or_path), split=split)


def load_examples(dataset_id_or_path: str, fmt: DataFormat, split: str = "train",
                  drop_bad_rows: bool = False, max_samples: int | None = None) -> list[Example]:
    """Load and parse a dataset into examples (errors name the source and row)."""
    ds = load_rows(dataset_id_or_path, split)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    examples = parse_rows(ds, fmt, source=str(dataset_id_or_path), drop_bad_rows=drop_bad_rows)
    if not examples:
        raise RowError(f"{dataset_id_or_path}: no usable rows")
    logger.info("loaded %d examples from %s (%s format)", len(examples), dataset_id_or_path, fmt.name)
    return examples


def load_dataset_examples(data, fmt_cfg) -> tuple[list[Example], DataFormat]:
    """Examples and their format from the data settings (:class:`~rlt.data.config.DataConfig`,
    :class:`~rlt.data.config.FormatConfig`); with ``data_format: auto`` the format comes from the columns."""
    source = data.require_dataset()
    ds = load_rows(source, data.dataset_split)
    if data.max_samples is not None:
        ds = ds.select(range(min(data.max_samples, len(ds))))
    fmt = resolve_format(fmt_cfg.data_format, ds.column_names, source=source,
                         student_system_prompt=fmt_cfg.student_system_prompt,
                         teacher_system_prompt=fmt_cfg.teacher_system_prompt)
    examples = parse_rows(ds, fmt, source=source, drop_bad_rows=data.drop_bad_rows)
    if not examples:
        raise RowError(f"{source}: no usable rows")
    logger.info("loaded %d examples from %s (%s format)", len(examples), source, fmt.name)
    return examples, fmt


def drop_longer(ds, length, limit: int | None, what: str, key: str):
    """``ds`` (a `datasets.Dataset`) without the rows whose ``length(row)`` exceeds ``limit`` (None: keep all),
    the count logged; a ConfigError naming ``key`` when no row is left. ``what``: a row, in the singular."""
    if limit is not None:
        kept = ds.filter(lambda r: length(r) <= limit)
        if len(kept) < len(ds):
            logger.warning("dropped %d of %d %ss longer than %s=%s tokens", len(ds) - len(kept), len(ds), what, key,
                           limit)
        ds = kept
    if len(ds) == 0:
        raise ConfigError(f"no {what} fits {key}={limit} tokens; raise {key}")
    return ds

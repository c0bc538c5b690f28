"""Loading question/solution datasets from local files or the hub.

Every problem with the input (a missing file, a malformed line, a value of the wrong type, a split that does
not exist) is a :class:`~rlt.errors.ConfigError` of one line naming the file, its line and column, and what is
accepted, raised before any model is loaded.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from rlt.data.examples import SKIP_HINT, Example, RowError, parse_rows
from rlt.data.formats import DataFormat, resolve_format
from rlt.errors import ConfigError

logger = logging.getLogger(__name__)

COUNTDOWN_RE = re.compile(r"^rlt-countdown:(\d+):(\d+)$")
COUNTDOWN_FORM = "rlt-countdown:N:SEED (N >= 1 questions, SEED an integer >= 0)"
BUILTIN_RE = re.compile(r"^rlt-(countdown|arith)(:|$)")
DEFAULT_SPLIT = "train"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
TEXT_COLUMNS = ("question", "prompt", "problem", "solution", "reasoning_trace", "system")  # a JSON string or null


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


# --- checking the values of JSON-lines rows before Arrow stores them -------------------------------------------

def _describe(value: Any) -> str:
    """A JSON value as the user wrote it, in words: 'a number (5)', 'a list', 'text'."""
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "text"
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def _value_problem(column: str, value: Any) -> str | None:
    """Why ``value`` cannot be the ``column`` of a row (None: it can). Only columns the loaders read are
    checked here; any column must also hold one type in all rows (:func:`_first_mixed_row`)."""
    if value is None:
        return None
    if column in TEXT_COLUMNS and not isinstance(value, str):
        return f"column {column!r} is {_describe(value)}; it takes text (a JSON string) or null"
    if column == "answer" and isinstance(value, (bool, list, dict)):
        return f"column 'answer' is {_describe(value)}; it takes text or a number"
    if column == "conversations" and not _is_turn_list(value):
        return ("column 'conversations' takes a list of {\"from\": ..., \"value\": ...} objects with text "
                f"values; found {_describe(value)}" + (" holding something else" if isinstance(value, list) else ""))
    return None


def _is_turn_list(value: Any) -> bool:
    """Whether ``value`` is a list of objects whose values are all text (or null)."""
    return isinstance(value, list) and all(
        isinstance(turn, dict) and all(v is None or isinstance(v, str) for v in turn.values()) for turn in value)


def _first_mixed_row(values: list) -> int | None:
    """Index of the first value Arrow cannot store in one column with those before it (None: all fit)."""
    import pyarrow as pa

    def fits(n: int) -> bool:
        try:
            pa.array(values[:n])
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False
        return True

    if fits(len(values)):
        return None
    lo, hi = 1, len(values)  # the shortest prefix that does not fit has hi values
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if fits(mid) else (lo, mid)
    return lo - 1


def _mixed_message(column: str, values: list, lines: list[int], i: int) -> str:
    """The one-line reason the value at ``i`` cannot share ``column`` with the earlier values."""
    earlier = next(((v, n) for v, n in zip(values[:i], lines[:i]) if v is not None), None)
    here, there = _describe(values[i]), _describe(earlier[0]) if earlier else ""
    if earlier and here == there:
        there = f"{there} of other values"
    where = f" but {there} on line {earlier[1]}" if earlier else ""
    return f"column {column!r} is {here}{where}; a column holds one type of value (or null)"


def _union_columns(rows: list[dict]) -> list[str]:
    """Every column any row has, in the order they first appear."""
    return list(dict.fromkeys(key for row in rows for key in row))


def check_rows(path: str | Path, numbered: list[tuple[int, dict]], drop_bad_rows: bool = False,
               bad: list[int] | None = None) -> list[tuple[int, dict]]:
    """The (line, row) pairs whose values fit their columns: text columns hold text, and each column one type.

    A bad value raises :class:`RowError` naming the file, line and column and what the column takes, or with
    ``drop_bad_rows`` its row is skipped and the line appended to ``bad``.
    """
    bad = [] if bad is None else bad

    def reject(lineno: int, message: str) -> None:
        if not drop_bad_rows:
            raise RowError(f"{path}, line {lineno}: {message} {SKIP_HINT}")
        bad.append(lineno)

    kept = []
    for lineno, row in numbered:
        problem = next(filter(None, (_value_problem(c, v) for c, v in row.items())), None)
        if problem:
            reject(lineno, problem)
        else:
            if isinstance(row.get("answer"), (int, float)):  # a number, here, is text in another row: one column
                row = {**row, "answer": str(row["answer"])}
            kept.append((lineno, row))
    for column in _union_columns([row for _, row in kept]):
        values = [row.get(column) for _, row in kept]
        while (i := _first_mixed_row(values)) is not None:
            reject(kept[i][0], _mixed_message(column, values, [n for n, _ in kept], i))
            del kept[i], values[i]
    return kept


def read_jsonl_table(path: Path, drop_bad_rows: bool = False):
    """(`datasets.Dataset`, 1-based file line of each row) of a JSON-lines file; every column of any row
    (a row without it: None), each value checked first (:func:`check_rows`)."""
    import datasets

    bad: list[int] = []
    kept = check_rows(path, list(read_jsonl(path, skip_bad=drop_bad_rows, bad=bad)), drop_bad_rows, bad)
    if bad:
        logger.warning("%s: dropped %d bad line(s) (first lines: %s)", path, len(bad), sorted(bad)[:10])
    if not kept:
        raise RowError(f"{path}: no rows" if not bad else f"{path}: no usable rows (all {len(bad)} are bad)")
    rows = [row for _, row in kept]
    columns = {c: [row.get(c) for row in rows] for c in _union_columns(rows)}
    try:
        ds = datasets.Dataset.from_dict(columns)
    except Exception as e:  # noqa: BLE001 - check_rows should have caught it; still name the file
        raise ConfigError(f"{path}: cannot store its rows as a table ({_one_line(e)})") from None
    return ds, [n for n, _ in kept]


# --- where the rows come from ------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), at most 300 characters."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _require_default_split(split: str, source: str, what: str) -> None:
    """Refuse a ``dataset_split`` for a source without splits rather than ignore it; ``what`` says why the
    source has none (e.g. "is a single file")."""
    if split != DEFAULT_SPLIT:
        raise ConfigError(f"dataset_split={split}: {source} {what}; leave dataset_split at {DEFAULT_SPLIT!r} "
                          "(splits exist only for hub datasets and directories)")


def _builtin_rows(spec: str) -> list[dict]:
    """Rows of an embedded dataset id (``rlt-countdown:N:SEED`` or ``rlt-arith:SPLIT:N:SEED[:...]``)."""
    if spec.startswith("rlt-countdown"):
        from rlt.data.countdown import generate_rows, to_stratos

        m = COUNTDOWN_RE.match(spec)
        if m is None or int(m.group(1)) < 1:
            size = f"N={m.group(1)} must be >= 1; " if m else ""
            raise ConfigError(f"dataset_id_or_path={spec}: {size}write {COUNTDOWN_FORM}")
        return [to_stratos(r) for r in generate_rows(int(m.group(1)), seed=int(m.group(2)))]
    from rlt.data.arithmetic import ID_RE, SPLITS, parse_id, stratos_rows_of_id

    form = f"rlt-arith:SPLIT:N:SEED[:key-value+...] (SPLIT one of {list(SPLITS)}, N >= 1)"
    try:
        parsed = parse_id(spec) if ID_RE.match(spec) else None
    except ConfigError as e:  # a bad option after SEED
        raise ConfigError(f"dataset_id_or_path={spec}: {e}") from None
    if parsed is None or parsed[1] < 1:
        size = f"N={parsed[1]} must be >= 1; " if parsed else ""
        raise ConfigError(f"dataset_id_or_path={spec}: {size}write {form}")
    return stratos_rows_of_id(spec)


def looks_local(spec: str) -> bool:
    """Whether a source that does not exist was meant as a local path: not shaped like a hub id
    (:func:`rlt.models.looks_like_hub_id`), or ending with a data-file suffix."""
    from rlt.models import looks_like_hub_id

    return not looks_like_hub_id(spec) or Path(spec).suffix in _FILE_BUILDERS


def _json_syntax_problem(path: Path) -> str | None:
    """Where a .json file (one JSON document, or JSON lines) breaks JSON syntax; None when it does not.
    A JSON-lines file with a bad line raises :class:`RowError` naming the line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte {e.start})"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            return f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
        for _ in read_jsonl(path):  # several documents: JSON lines, each checked
            pass
    return None


def _csv_as_text(path: Path) -> dict:
    """For a .csv file, features that read every column as text: else pandas guesses types per column, and an
    answer `4` becomes `4.0` beside a blank cell, `007` becomes 7, and a solution `4` is no text at all."""
    if path.suffix != ".csv":
        return {}
    import datasets
    import pandas as pd

    try:   # the column names as the loader's pandas reads them (a BOM dropped, an unnamed index "Unnamed: 0")
        header = list(pd.read_csv(path, nrows=0).columns)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError):
        return {}   # the loader below reports the file's problem
    if not header:
        return {}
    return {"features": datasets.Features({str(name): datasets.Value("string") for name in header})}


def _file_rows(path: Path):
    """A local .json, .parquet or .csv file as a `datasets.Dataset`; an unreadable one is a ConfigError."""
    import datasets
    import pyarrow as pa

    builder = _FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise ConfigError(f"dataset_id_or_path={path}: unsupported file type {path.suffix!r}; "
                          f"use one of {sorted(_FILE_BUILDERS)}")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **_csv_as_text(path))
    except (datasets.exceptions.DatasetsError, pa.ArrowException, StopIteration) as e:
        error = e
    if path.stat().st_size == 0 or isinstance(error, StopIteration):
        raise ConfigError(f"{path}: empty file, no rows")
    syntax = _json_syntax_problem(path) if path.suffix == ".json" else None
    reason = syntax or _one_line(error.__cause__ or error.__context__ or error)
    raise ConfigError(f"{path}: cannot read it as a {path.suffix} file: {reason}")


def _several_configs(e: Exception, spec: str, config: str | None) -> ConfigError | None:
    """The one-line error for a dataset with several configurations and none (or an unknown one) chosen."""
    configs = re.search(r"(?:available configs|not found\. Available): (\[[^\]]*\])", str(e))
    if not (isinstance(e, ValueError) and configs):
        return None
    given = f"dataset_config={config} is not one of them" if config else "give dataset_config=NAME"
    return ConfigError(f"dataset_id_or_path={spec} has several configurations, {configs.group(1)}: {given}")


def _dir_rows(path: Path, split: str, config: str | None = None):
    """A directory saved with `save_to_disk`, or a directory of data files, as a `datasets.Dataset`."""
    import datasets
    from datasets.data_files import EmptyDatasetError

    if any((path / marker).exists() for marker in SAVED_MARKERS):
        ds = datasets.load_from_disk(str(path))
        if not isinstance(ds, datasets.DatasetDict):
            _require_default_split(split, str(path), "is a saved dataset without splits")
            return ds
        if split not in ds:
            raise ConfigError(f"dataset_split={split}: {path} has the splits {sorted(ds)}")
        return ds[split]
    try:
        return datasets.load_dataset(str(path), config, split=split)
    except EmptyDatasetError:
        raise ConfigError(f"{path}: no data files in this directory (give .jsonl/.json/.parquet/.csv files or a "
                          "dataset saved with save_to_disk)") from None
    except datasets.exceptions.DatasetsError as e:
        raise ConfigError(f"{path}: cannot read its data files: {_one_line(e.__cause__ or e)}") from None
    except ValueError as e:
        several = _several_configs(e, str(path), config)
        if several:
            raise several from None
        if "split" not in str(e).lower():
            raise
        raise ConfigError(f"dataset_split={split}: {path} has no such split ({_one_line(e)})") from None


def load_table(dataset_id_or_path: str, split: str = DEFAULT_SPLIT, drop_bad_rows: bool = False,
               config: str | None = None):
    """(rows as a `datasets.Dataset`, 1-based file line of each row or None) of ``rlt-countdown:N:SEED`` or
    ``rlt-arith:...`` (embedded, Stratos schema), a local jsonl/json/parquet/csv file, a directory saved with
    `save_to_disk`, a directory of data files, or a hub id. Line numbers exist for JSON-lines files only;
    there ``drop_bad_rows`` skips malformed lines and values of the wrong type (count and lines logged)."""
    import datasets

    spec = str(dataset_id_or_path)
    local = Path(spec).expanduser()
    saved = local.is_dir() and any((local / marker).exists() for marker in SAVED_MARKERS)
    if config is not None and (BUILTIN_RE.match(spec) or local.is_file() or saved):
        raise ConfigError(f"dataset_config={config}: {spec} has no configurations (a built-in dataset, a file, or a "
                          "dataset saved with save_to_disk); leave dataset_config null")
    if BUILTIN_RE.match(spec):
        rows = _builtin_rows(spec)
        _require_default_split(split, spec, "has its split in the id (rlt-arith:SPLIT:N:SEED)"
                               if spec.startswith("rlt-arith") else "is a built-in dataset without splits")
        return datasets.Dataset.from_list(rows), None
    path = Path(spec).expanduser()
    if path.is_file():
        _require_default_split(split, spec, "is a single file, without splits")
        return read_jsonl_table(path, drop_bad_rows) if path.suffix == ".jsonl" else (_file_rows(path), None)
    if path.is_dir():
        return _dir_rows(path, split, config), None
    if looks_local(spec):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"dataset_id_or_path={spec}: no such file or directory{where}")
    try:
        return datasets.load_dataset(spec, config, split=split), None
    except Exception as e:  # not found, gated, offline, no network, no such split: named by type and first line
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise ConfigError(f"dataset_split={split}: {spec} has no such split ({_one_line(e)})") from None
        several = _several_configs(e, spec, config)
        if several:
            raise several from None
        raise ConfigError(f"dataset_id_or_path={spec}: not a local path, and the hub could not give it "
                          f"({type(e).__name__}: {_one_line(e)})") from None


def load_rows(dataset_id_or_path: str, split: str = DEFAULT_SPLIT, drop_bad_rows: bool = False):
    """Rows of a dataset as a `datasets.Dataset` (see :func:`load_table`, which also gives line numbers)."""
    return load_table(dataset_id_or_path, split, drop_bad_rows)[0]


def _first(ds, lines: list[int] | None, max_samples: int | None):
    """The first ``max_samples`` rows (None: all) and their line numbers."""
    if max_samples is None:
        return ds, lines
    n = min(max_samples, len(ds))
    return ds.select(range(n)), None if lines is None else lines[:n]


def load_examples(dataset_id_or_path: str, fmt: DataFormat, split: str = DEFAULT_SPLIT,
                  drop_bad_rows: bool = False, max_samples: int | None = None) -> list[Example]:
    """Load and parse a dataset into examples (errors name the source and the row, or a file's line)."""
    ds, lines = _first(*load_table(dataset_id_or_path, split, drop_bad_rows), max_samples)
    examples = parse_rows(ds, fmt, source=str(dataset_id_or_path), drop_bad_rows=drop_bad_rows, lines=lines)
    if not examples:
        raise RowError(f"{dataset_id_or_path}: no usable rows")
    logger.info("loaded %d examples from %s (%s format)", len(examples), dataset_id_or_path, fmt.name)
    return examples


def load_data_table(data):
    """(rows, their 1-based file lines or None) of the data settings (:class:`~rlt.data.config.DataConfig`):
    ``dataset_split``, ``drop_bad_rows`` and ``max_samples`` applied (see :func:`load_table`)."""
    return _first(*load_table(data.require_dataset(), data.dataset_split, data.drop_bad_rows, data.dataset_config),
                  data.max_samples)


def load_dataset_examples(data, fmt_cfg) -> tuple[list[Example], DataFormat]:
    """Examples and their format from the data settings (:class:`~rlt.data.config.DataConfig`,
    :class:`~rlt.data.config.FormatConfig`); with ``data_format: auto`` the format comes from the columns."""
    source = data.require_dataset()
    ds, lines = load_data_table(data)
    fmt = resolve_format(fmt_cfg.data_format, ds.column_names, source=source,
                         student_system_prompt=fmt_cfg.student_system_prompt,
                         teacher_system_prompt=fmt_cfg.teacher_system_prompt)
    examples = parse_rows(ds, fmt, source=source, drop_bad_rows=data.drop_bad_rows, lines=lines)
    if not examples:
        raise RowError(f"{source}: no usable rows")
    logger.info("loaded %d examples from %s (%s format)", len(examples), source, fmt.name)
    cut = sum(v is False for v in ds["end_tag"]) if "end_tag" in ds.column_names else 0
    if cut:   # rlt.distill's rows: false when a cut-off explanation was kept (missing_end_tag=penalise)
        logger.warning("%s: %d of %d rows hold a cut-off explanation (end_tag false, kept by rlt.distill's "
                       "missing_end_tag=penalise); a model trained on them learns to end its thought early",
                       source, cut, len(ds))
    return examples, fmt


def fitting(lengths: list[int], limit: int | None, what: str, key: str) -> list[int]:
    """Indices of the ``lengths`` (tokens) of at most ``limit`` (None: all); the count of the others is logged,
    and a ConfigError names ``key`` when none is left. ``what``: one item, in the singular."""
    keep = [i for i, n in enumerate(lengths) if limit is None or n <= limit]
    if len(keep) < len(lengths):
        logger.warning("dropped %d of %d %ss longer than %s=%s tokens", len(lengths) - len(keep), len(lengths), what,
                       key, limit)
    if not keep:
        raise ConfigError(f"no {what} fits {key}={limit} tokens; raise {key}")
    return keep


def drop_longer(ds, length, limit: int | None, what: str, key: str):
    """``ds`` (a `datasets.Dataset`) without the rows whose ``length(row)`` exceeds ``limit`` (:func:`fitting`)."""
    keep = fitting([length(r) for r in ds] if limit is not None else [0] * len(ds), limit, what, key)
    return ds if len(keep) == len(ds) else ds.select(keep)


def prompt_ids_within(tokenizer, prompts: list[str], max_prompt_length: int | None) -> dict[int, list[int]]:
    """{index: token ids} of the ``prompts`` of at most ``max_prompt_length`` tokens (None: all); longer ones are
    dropped as training drops them (:func:`fitting`)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return {i: ids[i] for i in fitting([len(x) for x in ids], max_prompt_length, "prompt", "max_prompt_length")}

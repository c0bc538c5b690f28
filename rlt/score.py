"""Offline scorer: the teacher reward for given completions.

    python -m rlt.score teacher=PATH student=PATH input=IN.jsonl output=OUT.jsonl \
        [teacher_temperature=0.7] [skip_bad_rows=false] [dtype=auto] [any reward key, e.g. kl_penalty_reward_coeff=[0,0]]
    python -m rlt.score --help      # every key with its default

Input rows: question, solution (content without tags), completion (teacher text
after the RL prompt), optional system (student system prompt); the RL run's
stored_completions/*.jsonl are such rows. Output rows: the input plus `reward`
and `reward_components`. Every row and the output's directory are checked
before any model loads; a bad row stops the run (nothing is written) unless
skip_bad_rows=true.

Scored rows are appended to OUT.partial batch by batch (synced), with the
settings that score them in OUT.partial.json; at the end OUT.partial becomes
OUT. A run that stops early keeps them: the same command goes on after the
rows already scored (a torn last line is cut off). A partial file from other
input rows or other settings is refused in one line before any model loads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import field
from pathlib import Path

from rlt.cli import (append_jsonl_synced, check_same_settings, check_writable_file, user_errors, without_torn_line,
                     write_json_atomic)
from rlt.config import compose_tool
from rlt.data.config import FormatConfig
from rlt.data.examples import RowError
from rlt.errors import ConfigError
from rlt.logging_utils import setup_logging
from rlt.models import ModelConfig
from rlt.rewards.config import RewardConfig

logger = logging.getLogger("rlt.score")


@dataclasses.dataclass
class ScoreConfig:
    """What to score and where to write it (the teacher is model_name_or_path, the student student_model)."""

    input: str | None = field(default=None, metadata={"help": "JSON-lines rows: question, solution, completion[, system]"})
    output: str | None = field(default=None, metadata={"help": "JSON-lines output (written at the end, atomically)"})
    teacher_temperature: float = field(default=0.7, metadata={
        "help": "temperature the completions were sampled at (teacher log-probs are unbiased with it)"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip bad rows (their lines are logged) instead of stopping"})
    batch_size: int = field(default=64, metadata={"help": "rows per reward call"})
    device: str = field(default="auto", metadata={
        "help": "where teacher and student score: auto (a GPU when torch sees one, else cpu) | cpu | cuda | cuda:N"})

    def __post_init__(self):
        for key in ("input", "output"):
            if not getattr(self, key):
                raise ConfigError(f"{key}=... is required")
        if self.teacher_temperature <= 0:
            raise ConfigError(f"teacher_temperature={self.teacher_temperature} must be > 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")


def read_items(path: str, tokenizer, fmt, skip_bad_rows: bool):
    """(row, RewardInput) pairs; a bad row raises RowError with its line number unless skipped."""
    from rlt.data.loading import read_jsonl
    from rlt.data.text import teacher_prompt
    from rlt.rewards.teacher_reward import RewardInput

    out, bad = [], []
    if not Path(path).is_file():
        raise ConfigError(f"input={path}: no such file")
    for lineno, row in read_jsonl(path, skip_bad=skip_bad_rows, bad=bad):
        try:
            missing = [k for k in ("question", "solution", "completion") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"missing or non-text field(s) {missing}")
            for key in ("question", "solution"):
                if not row[key].strip():
                    raise ValueError(f"empty {key}")
            if row.get("system") is not None and not isinstance(row["system"], str):
                raise ValueError("'system' must be text")
            item = RewardInput(teacher_prompt(tokenizer, row["question"], row["solution"], fmt), row["completion"],
                               row["question"], row["solution"], row.get("system"))
        except ConfigError:   # the tokenizer's chat template, not this row (ConfigError is a ValueError)
            raise
        except ValueError as e:
            if not skip_bad_rows:
                raise RowError(f"{path}, line {lineno}: {e} (skip_bad_rows=true skips such rows)") from None
            bad.append(lineno)
            continue
        out.append((row, item))
    if bad:
        logger.warning("%s: skipped %d bad row(s) at line(s) %s", path, len(bad), sorted(bad)[:20])
    if not out:
        raise RowError(f"{path}: no row to score")
    return out


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    with user_errors("rlt.score"):
        objs = compose_tool("rlt.score", ScoreConfig, (ModelConfig, FormatConfig, RewardConfig),
                            sys.argv[1:] if argv is None else argv, __doc__)
        score(objs[ScoreConfig], objs[ModelConfig], objs[FormatConfig], objs[RewardConfig])


def score(cfg: ScoreConfig, model: ModelConfig, fmt_cfg: FormatConfig, reward: RewardConfig) -> int:
    """Score every row of cfg.input into cfg.output; returns the number of rows written."""
    from tqdm import tqdm

    from rlt.data.formats import resolve_format
    from rlt.models import load_tokenizer, resolve_device, resolve_model_path
    from rlt.rewards.logprobs import check_reward_device
    from rlt.rewards.teacher_reward import load_scorer

    if not reward.student_model:
        raise ConfigError("student=... (student_model) is required: the reward's frozen student")
    device = resolve_device(cfg.device, "device")
    check_reward_device(reward, device)
    if not Path(cfg.input).is_file():
        raise ConfigError(f"input={cfg.input}: no such file")
    check_writable_file(cfg.output)
    teacher, student = model.require_model(), reward.student_model
    resolve_model_path(teacher, "teacher")  # a wrong path or id: one line before anything loads
    resolve_model_path(student, "student")
    fmt = resolve_format(fmt_cfg.data_format, student_system_prompt=fmt_cfg.student_system_prompt,
                         teacher_system_prompt=fmt_cfg.teacher_system_prompt)
    tokenizer = load_tokenizer(teacher)
    rows = read_items(cfg.input, tokenizer, fmt, cfg.skip_bad_rows)
    out = Path(cfg.output)
    partial, meta = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    settings = {"teacher": teacher, "student": student, "teacher_temperature": cfg.teacher_temperature,
                "dtype": model.dtype, "format": dataclasses.asdict(fmt_cfg), "reward": dataclasses.asdict(reward)}
    done = scored_before(partial, meta, settings, [row for row, _ in rows])
    if done:
        logger.info("%s: %d of %d row(s) already scored by an earlier run; going on after them", partial, done,
                    len(rows))
    todo = rows[done:]
    if todo:
        scorer = load_scorer(teacher, student, tokenizer, fmt, reward, cfg.teacher_temperature, model.dtype, device)
        write_json_atomic(meta, settings)
        with open(partial, "a") as f:
            for s in tqdm(range(0, len(todo), cfg.batch_size), desc="scoring", unit="batch"):
                chunk = todo[s:s + cfg.batch_size]
                res = scorer([item for _, item in chunk])
                scored = []
                for k, (row, _) in enumerate(chunk):
                    comps = {n: (None if v[k] != v[k] else float(v[k])) for n, v in res.components.items()}  # NaN
                    scored.append({**row, "reward": float(res.rewards[k]), "reward_components": comps})
                append_jsonl_synced(f, scored)  # one write per batch: a crash keeps the batches before it
    os.replace(partial, out)
    meta.unlink(missing_ok=True)
    logger.info("scored %d row(s) -> %s", len(rows), out)
    return len(rows)


SAME_ROW = ("question", "solution", "completion", "system")  # what identifies an input row in the partial file


def scored_before(partial: Path, meta: Path, settings: dict, rows: list[dict]) -> int:
    """How many of ``rows`` (in order) an earlier run already scored into ``partial``, after cutting off a torn
    last line (logged). A partial file whose rows are not the first input rows, or that was scored with other
    ``settings`` (``meta``), is a ConfigError naming it and what differs."""
    if not partial.exists():
        return 0
    keep = "delete it (and its .json) to score from the start, or give the same input and settings"
    check_same_settings(meta, settings, f"{partial}: scored", keep)
    raw = partial.read_bytes()
    data = without_torn_line(partial, raw)
    if data != raw:
        partial.write_bytes(data)
    lines = data.decode("utf-8", errors="replace").splitlines()
    if len(lines) > len(rows):
        raise ConfigError(f"{partial}: holds {len(lines)} scored rows but the input has {len(rows)}; {keep}")
    for lineno, (line, row) in enumerate(zip(lines, rows), 1):
        try:
            got = json.loads(line)
            same = isinstance(got, dict) and all(got.get(k) == row.get(k) for k in SAME_ROW)
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"{partial}, line {lineno}: not the same row as the input's row {lineno} to score "
                              f"(another input?); {keep}")
    return len(lines)


if __name__ == "__main__":
    main()

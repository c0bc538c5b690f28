"""Offline scorer: the teacher reward for given completions.

    python -m rlt.score teacher=PATH student=PATH input=IN.jsonl output=OUT.jsonl \
        [teacher_temperature=0.7] [skip_bad_rows=false] [dtype=float32] \
        [data_format=bespoke_stratos] [student_system_prompt=...] [teacher_system_prompt=...] \
        [any reward key, e.g. kl_penalty_reward_coeff=[0,0]]

Input rows: question, solution (content without tags), completion (teacher text
after the RL prompt), optional system (student system prompt). Output rows:
the input plus `reward` and `reward_components`. Every row is checked before
scoring; a bad row stops the run (nothing is written) unless skip_bad_rows=true.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from rlt.cli import parse_kv
from rlt.rewards.config import REWARD_CFG_YAML
from rlt.logging_utils import setup_logging

logger = logging.getLogger("rlt.score")
CLI_DEFAULTS = {"teacher": None, "student": None, "input": None, "output": None, "teacher_temperature": 0.7,
                "skip_bad_rows": False, "dtype": "float32", "data_format": "bespoke_stratos",
                "student_system_prompt": None, "teacher_system_prompt": None, "batch_size": 64}


def parse_args(argv: list[str]) -> dict:
    return parse_kv(argv, CLI_DEFAULTS, ("teacher", "student", "input", "output"), "rlt.score", REWARD_CFG_YAML)


def read_items(path: str, tokenizer, fmt, skip_bad_rows: bool):
    """(row, RewardInput) pairs; bad rows raise with their line number unless skipped."""
    from rlt.data.text import teacher_prompt
    from rlt.rewards.teacher_reward import RewardInput

    out, bad = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = [k for k in ("question", "solution", "completion") if not isinstance(row.get(k), str)]
                if missing:
                    raise ValueError(f"missing or non-string field(s) {missing}")
                if not row["question"].strip():
                    raise ValueError("empty question")
                item = RewardInput(teacher_prompt(tokenizer, row["question"], row["solution"], fmt), row["completion"],
                                   row["question"], row["solution"], row.get("system"))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                if not skip_bad_rows:
                    raise SystemExit(f"rlt.score: {path}, line {lineno}: {e} (skip_bad_rows=true skips such rows; "
                                     "nothing was written)") from None
                bad.append(lineno)
                continue
            out.append((row, item))
    if bad:
        logger.warning("%s: skipped %d bad row(s) at line(s) %s", path, len(bad), bad[:20])
    return out


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tqdm import tqdm

    from rlt.data.formats import resolve_format
    from rlt.models import load_tokenizer
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.teacher_reward import load_scorer

    fmt = resolve_format(args["data_format"], student_system_prompt=args["student_system_prompt"],
                         teacher_system_prompt=args["teacher_system_prompt"])
    tokenizer = load_tokenizer(args["teacher"])
    rows = read_items(args["input"], tokenizer, fmt, args["skip_bad_rows"])
    try:
        score = load_scorer(args["teacher"], args["student"], tokenizer, fmt, RewardConfig.from_dict(args),
                            args["teacher_temperature"], args["dtype"])
    except ValueError as e:
        raise SystemExit(f"rlt.score: {e}") from None
    scored = []
    for s in tqdm(range(0, len(rows), args["batch_size"]), desc="scoring", unit="batch"):
        chunk = rows[s:s + args["batch_size"]]
        res = score([item for _, item in chunk])
        for k, (row, _) in enumerate(chunk):
            comps = {n: (None if v[k] != v[k] else float(v[k])) for n, v in res.components.items()}  # NaN -> null
            scored.append({**row, "reward": float(res.rewards[k]), "reward_components": comps})
    out = Path(args["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    with open(tmp, "w") as f:
        for row in scored:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    logger.info("scored %d row(s) -> %s", len(scored), out)


if __name__ == "__main__":
    main()

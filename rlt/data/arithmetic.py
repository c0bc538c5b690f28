"""Embedded running-sum task: add a list of single-digit numbers, with worked steps.

A question asks for the sum of 4-7 digits ("What is 3 + 7 + 5 + 9 + 2?"). A
fully worked trace adds one number per step, each step restating the running
total::

    3 + 7 = 10
    10 + 5 = 15
    15 + 9 = 24
    24 + 2 = 26

Every step is a small table lookup (a number below 100 plus one digit), so a
tiny model can learn it. The *raw* traces of this task imitate what makes
large-model reasoning traces hard to learn from: they are always correct, but
the writer sometimes skips steps it finds obvious, folding the next number(s)
into one step ("10 + 5 + 9 = 24"): each boundary between two additions is
folded with probability ``merge_prob``. A folded step asks the reader to add
several numbers in its head. The gold answer is the solution's ``\\boxed{}``.

Rows carry a short student system prompt (STUDENT_SYSTEM_PROMPT); runs on this task set
``teacher_system_prompt`` to TEACHER_SYSTEM_PROMPT (cfgs/experiment/*.yaml do).

Splits are disjoint by construction: a question's split is fixed by a hash of
its numbers in order (80% train, 10% validation, 10% test), whatever the seed or
N. A test question can be a reordering of a training one: the same sum, other
steps (209 of the experiment's 400 test questions against its 4000 training
ones). Every arm of the experiment trains on the same questions, so this lifts
all arms alike; absolute accuracies are those of sums partly seen in another order.

    dataset_id_or_path: rlt-arith:SPLIT:N:SEED[:key-value+key-value...]
        SPLIT train | validation | test; N rows (distinct questions); SEED of the sampler;
        keys: min_terms, max_terms (4, 7), max_digit (9), merge_prob (0.35), trace (raw | full),
        e.g. rlt-arith:train:2000:0:trace-full+max_terms-9 (no '=' or ',': Hydra overrides stay unquoted)
    python -m rlt.data.arithmetic OUT_DIR --split train --n 200 [--seed 0] [--merge-prob 0.35]
writes OUT_DIR/stratos.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import re
from pathlib import Path

from rlt.data.formats import FORMATS
from rlt.data.text import stratos_row
from rlt.errors import ConfigError

logger = logging.getLogger(__name__)
SPLITS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}  # hash bucket (mod 10) -> split
# Short system prompts: at this scale every prompt token costs training time.
STUDENT_SYSTEM_PROMPT = "Add the numbers step by step, then give the sum."
TEACHER_SYSTEM_PROMPT = "You know the sum. Explain step by step how to reach it."
ID_RE = re.compile(r"^rlt-arith:(train|validation|test):(\d+):(\d+)(?::([A-Za-z_0-9.+-]*))?$")


@dataclasses.dataclass(frozen=True)
class ArithTask:
    """Shape of the questions and of the raw traces."""

    min_terms: int = 4
    max_terms: int = 7
    max_digit: int = 9
    merge_prob: float = 0.35  # probability that a raw trace folds the next addition into the current step
    trace: str = "raw"        # raw: steps folded with merge_prob | full: every addition its own step

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ConfigError(f"rlt-arith: need 2 <= min_terms <= max_terms (got {self.min_terms}, {self.max_terms})")
        if not 1 <= self.max_digit <= 9:
            raise ConfigError(f"rlt-arith: max_digit={self.max_digit} must be in 1..9")
        if not 0.0 <= self.merge_prob <= 1.0:
            raise ConfigError(f"rlt-arith: merge_prob={self.merge_prob} must be in [0, 1]")
        if self.trace not in ("raw", "full"):
            raise ConfigError(f"rlt-arith: trace={self.trace!r}: choose raw or full")


def split_of(numbers: list[int] | tuple[int, ...]) -> str:
    """The split a question belongs to (a hash of its numbers; independent of any seed)."""
    bucket = int(hashlib.sha256(",".join(map(str, numbers)).encode()).hexdigest()[:8], 16) % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def question_text(numbers: list[int]) -> str:
    return f"What is {' + '.join(map(str, numbers))}?"


def solution_text(total: int) -> str:
    return f"\n\nThe sum is {total}.\n\n\\boxed{{{total}}}\n\n"


def group_steps(n_terms: int, merge_prob: float, rng: random.Random | None) -> list[int]:
    """How many numbers each step adds after the running total: the first step adds numbers 2.., every
    later step starts from the previous total. Each boundary between additions is folded with merge_prob."""
    sizes = [1]
    for _ in range(n_terms - 2):
        if rng is not None and rng.random() < merge_prob:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def trace_text(numbers: list[int], sizes: list[int]) -> str:
    """Worked steps: each step is ``total + a [+ b ...] = new total``; padded with blank lines like Stratos."""
    lines, total, k = [], numbers[0], 1
    for size in sizes:
        terms = numbers[k:k + size]
        new = total + sum(terms)
        lines.append(f"{total} + {' + '.join(map(str, terms))} = {new}")
        total, k = new, k + size
    lines.append(f"So the sum is {total}.")
    return "\n\n" + "\n\n".join(lines) + "\n\n"


def parse_steps(thought: str) -> list[tuple[list[int], int]] | None:
    """([operands], stated result) of each step line of a trace, or None when a line is not a step."""
    steps = []
    for line in [ln.strip() for ln in thought.strip().split("\n\n") if ln.strip()]:
        if line.startswith("So the sum is"):
            continue
        m = re.fullmatch(r"(\d+(?: \+ \d+)+) = (\d+)", line)
        if not m:
            return None
        steps.append(([int(x) for x in m.group(1).split(" + ")], int(m.group(2))))
    return steps


def trace_stats(thought: str) -> dict:
    """Shape of an explanation: steps, how many add more than one number (folded), arithmetic slips, whether
    it parses as steps and reaches a final statement."""
    steps = parse_steps(thought)
    if steps is None:
        return {"parsed": False, "steps": 0, "folded_steps": 0, "wrong_steps": 0}
    return {"parsed": True, "steps": len(steps), "folded_steps": sum(len(ops) > 2 for ops, _ in steps),
            "wrong_steps": sum(sum(ops) != res for ops, res in steps)}


def generate_rows(split: str, n: int, seed: int = 0, task: ArithTask = ArithTask()) -> list[dict]:
    """n distinct questions of ``split`` as dicts with question, solution, reasoning_trace, answer, operands."""
    if split not in SPLITS:
        raise ConfigError(f"rlt-arith: split {split!r}: choose one of {list(SPLITS)}")
    rng = random.Random(f"{split}:{seed}")
    trace_rng = random.Random(f"trace:{split}:{seed}")
    seen, rows, tries = set(), [], 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ConfigError(f"rlt-arith: could not find {n} distinct {split} questions for {task}")
        numbers = tuple(rng.randint(1, task.max_digit) for _ in range(rng.randint(task.min_terms, task.max_terms)))
        if numbers in seen or split_of(numbers) != split:
            continue
        seen.add(numbers)
        sizes = group_steps(len(numbers), task.merge_prob if task.trace == "raw" else 0.0, trace_rng)
        total = sum(numbers)
        rows.append({"question": question_text(list(numbers)), "solution": solution_text(total),
                     "reasoning_trace": trace_text(list(numbers), sizes), "answer": str(total),
                     "operands": list(numbers)})
    return rows


def to_stratos(row: dict, system: str = STUDENT_SYSTEM_PROMPT) -> dict:
    """The row as Stratos data (system + conversations) with its answer and operands."""
    return stratos_row(row["question"], row["reasoning_trace"], row["solution"], system, FORMATS["bespoke_stratos"],
                       answer=row["answer"], operands=row["operands"])


def parse_task(spec: str | None) -> ArithTask:
    """An :class:`ArithTask` from ``key-value+key-value...`` (empty: the defaults)."""
    if not spec:
        return ArithTask()
    types = {f.name: f.type for f in dataclasses.fields(ArithTask)}
    kw = {}
    for part in spec.split("+"):
        key, _, value = part.partition("-")
        if key not in types or not value:
            raise ConfigError(f"rlt-arith: bad option {part!r}; keys: {sorted(types)}")
        kind = str if key == "trace" else float if key == "merge_prob" else int
        try:
            kw[key] = kind(value)
        except ValueError:
            raise ConfigError(f"rlt-arith: option {part!r}: {key} takes "
                              f"{'a number' if kind is float else 'an integer'}") from None
    return ArithTask(**kw)


def parse_id(dataset_id: str) -> tuple[str, int, int, ArithTask] | None:
    """(split, n, seed, task) of an ``rlt-arith:...`` id, or None for any other string."""
    m = ID_RE.match(str(dataset_id))
    if not m:
        if str(dataset_id).startswith("rlt-arith:"):
            raise ConfigError(f"{dataset_id}: write rlt-arith:SPLIT:N:SEED[:key-value+...] with SPLIT one of "
                              f"{list(SPLITS)}")
        return None
    return m.group(1), int(m.group(2)), int(m.group(3)), parse_task(m.group(4))


def stratos_rows_of_id(dataset_id: str) -> list[dict] | None:
    """Stratos rows of an ``rlt-arith:...`` id (None for other ids)."""
    parsed = parse_id(dataset_id)
    if parsed is None:
        return None
    split, n, seed, task = parsed
    return [to_stratos(r) for r in generate_rows(split, n, seed, task)]


def write_dataset(out: str | Path, split: str, n: int, seed: int = 0, task: ArithTask = ArithTask()) -> Path:
    """Write Stratos rows to ``out`` (a .jsonl path, or a directory: OUT/stratos.jsonl)."""
    out = Path(out)
    path = out if out.suffix == ".jsonl" else out / "stratos.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in generate_rows(split, n, seed, task):
            f.write(json.dumps(to_stratos(r)) + "\n")
    logger.info("wrote %d %s rows to %s", n, split, path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--split", choices=list(SPLITS), default="train")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge-prob", type=float, default=ArithTask.merge_prob)
    ap.add_argument("--trace", choices=("raw", "full"), default="raw")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_dataset(args.out_dir, args.split, args.n, args.seed, ArithTask(merge_prob=args.merge_prob, trace=args.trace))


if __name__ == "__main__":
    main()

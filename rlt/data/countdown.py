"""Embedded Countdown task: reach a target from 3-4 numbers with + - * /.

The paper uses Countdown as its out-of-domain benchmark. A brute-force solver
writes a step-by-step trace and the final expression, so each row has a
question, a reasoning trace and a solution with a checkable answer.

    python -m rlt.data.countdown OUT_DIR --n 200 --seed 0
writes OUT_DIR/stratos.jsonl (system + conversations) and OUT_DIR/custom.jsonl
(question, solution, reasoning_trace).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
from fractions import Fraction
from pathlib import Path

from rlt.data.formats import DEFAULT_STUDENT_SYSTEM_PROMPT, FORMATS
from rlt.data.text import stratos_row

logger = logging.getLogger(__name__)
OPS = ("+", "-", "*", "/")


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def solve(numbers: list[int], target: int) -> list[tuple] | None:
    """Depth-first search combining two numbers at a time; returns the steps
    [(left_expr, op, right_expr, left_value, right_value, value)] of the first
    solution that uses all numbers."""
    def rec(items: list[tuple[str, Fraction]], steps):
        if len(items) == 1:
            return steps if items[0][1] == target else None
        for i, j in itertools.permutations(range(len(items)), 2):
            (ea, va), (eb, vb) = items[i], items[j]
            for op in OPS:
                if op in "+*" and i > j:
                    continue
                v = _apply(va, op, vb)
                if v is None or v < 0 or v.denominator != 1:
                    continue
                rest = [it for k, it in enumerate(items) if k not in (i, j)]
                found = rec(rest + [(f"({ea} {op} {eb})", v)], steps + [(ea, op, eb, va, vb, v)])
                if found is not None:
                    return found
        return None
    return rec([(str(n), Fraction(n)) for n in numbers], [])


def _strip_outer(expr: str) -> str:
    return expr[1:-1] if expr.startswith("(") and expr.endswith(")") else expr


def make_problem(rng: random.Random) -> dict:
    """One solvable problem: numbers, target, trace and final expression."""
    while True:
        numbers = [rng.randint(1, 25) for _ in range(rng.choice((3, 4)))]
        target = rng.randint(10, 100)
        steps = solve(numbers, target)
        if steps:
            break
    lines = [f"We need to combine {', '.join(map(str, numbers))} to reach {target}, using each number once."]
    for k, (_, op, _, va, vb, v) in enumerate(steps, 1):
        lines.append(f"Step {k}: {va} {op} {vb} = {v}.")
    expr = _strip_outer(f"({steps[-1][0]} {steps[-1][1]} {steps[-1][2]})")
    lines.append(f"So {expr} = {target}, which uses every number exactly once.")
    return {"numbers": numbers, "target": target, "trace": "\n\n" + "\n\n".join(lines) + "\n\n", "expression": expr}


def question_text(numbers: list[int], target: int) -> str:
    return (f"Using the numbers {numbers}, write an expression that equals {target}. "
            "Use +, -, * and / and each number exactly once.")


def solution_text(expr: str, target: int) -> str:
    return f"\n\nThe expression is {expr} = {target}.\n\n\\boxed{{{expr}}}\n\n"


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """n problems as dicts with question, solution, reasoning_trace, answer, numbers, target."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = make_problem(rng)
        rows.append({
            "question": question_text(p["numbers"], p["target"]),
            "solution": solution_text(p["expression"], p["target"]),
            "reasoning_trace": p["trace"],
            "answer": p["expression"],
            "numbers": p["numbers"],
            "target": p["target"],
        })
    return rows


def to_stratos(row: dict, system: str = DEFAULT_STUDENT_SYSTEM_PROMPT) -> dict:
    """The row as Stratos data (system + conversations) with its answer, numbers and target."""
    return stratos_row(row["question"], row["reasoning_trace"], row["solution"], system, FORMATS["bespoke_stratos"],
                       answer=row["answer"], numbers=row["numbers"], target=row["target"])


def write_dataset(out_dir: str | Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write stratos.jsonl and custom.jsonl under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_rows(n, seed)
    paths = {"stratos": out / "stratos.jsonl", "custom": out / "custom.jsonl"}
    with open(paths["stratos"], "w") as f:
        for r in rows:
            f.write(json.dumps(to_stratos(r)) + "\n")
    with open(paths["custom"], "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    logger.info("wrote %d Countdown rows to %s", n, out)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_dataset(args.out_dir, args.n, args.seed)


if __name__ == "__main__":
    main()

"""Extracting and checking final answers.

extract_answer: the last \\boxed{...} (nested braces handled) of the solution
section (from the solution start tag to its end tag or the end of the text);
else, when the section was closed, its last non-empty line; without a solution
section, the last \\boxed{...} after the closed thought (or anywhere in a text without thought tags). Anything
else is no answer (None): a run-on thought (opened, never closed: e.g. cut at the token limit) is never read as an
answer, even when it holds a \\boxed{...}.
check_answer: Countdown rows (numbers + target) evaluate the expression
exactly; other answers go through math-verify, with a normalised exact match
when math-verify cannot parse them.
"""
from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

from rlt.data.formats import DataFormat


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def solution_section(text: str, fmt: DataFormat) -> tuple[str, bool] | None:
    """(content of the first solution section, whether its end tag was there), or None without one."""
    s0, s1 = fmt.solution_tags
    start = text.find(s0)
    if start < 0:
        return None
    body = text[start + len(s0):]
    end = body.find(s1)
    return (body, False) if end < 0 else (body[:end], True)


def extract_answer(text: str, fmt: DataFormat) -> str | None:
    section = solution_section(text, fmt)
    if section is None:
        t0, t1 = fmt.think_tags
        if t0 in text and t1 not in text:  # a run-on thought
            return None
        after = text.split(t1, 1)[1] if t1 in text else text
        boxed = last_boxed(after)
        return boxed.strip() if boxed is not None and boxed.strip() else None
    body, closed = section
    boxed = last_boxed(body)
    if boxed is not None:
        return boxed.strip() or None
    if not closed:
        return None
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node, used: list[int]) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, used), _eval(node.right, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError("only integers and + - * / are allowed")


def check_countdown(expr: str | None, numbers: list[int], target: int) -> bool:
    """True if expr uses exactly the given numbers once each and equals target (exact arithmetic)."""
    if not expr:
        return False
    expr = expr.split("=")[0].replace("\\times", "*").replace("×", "*").replace("\\div", "/").replace("÷", "/")
    try:
        used: list[int] = []
        value = _eval(ast.parse(expr, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return Counter(used) == Counter(numbers) and value == target


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.").lower()


def check_answer(pred: str | None, gold: str, numbers: list[int] | None = None, target: int | None = None) -> bool:
    if pred is None:
        return False
    if numbers is not None and target is not None:
        return check_countdown(pred, numbers, target)
    from math_verify import parse, verify

    try:
        g, p = parse(f"${gold}$"), parse(f"${pred}$")
        if g and p:
            return bool(verify(g, p))
    except Exception:  # math-verify could not parse: fall back to exact match
        pass
    return _normalise(pred) == _normalise(gold)

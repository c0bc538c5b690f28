"""Extracting and checking final answers.

extract_answer: the last non-empty \\boxed{...} (nested braces handled; an
unbalanced one is skipped) of the solution section (from the solution start tag
to its end tag or the end of the text); else, when the section was closed, the
whole section (math-verify finds the answer in it); without a solution section,
the last \\boxed{...} after the closed thought (or anywhere in a text without
thought tags). Anything else is no answer (None): a run-on thought (opened,
never closed: e.g. cut at the token limit) is never read as an answer, even
when it holds a \\boxed{...} or a solution tag.
check_answer: Countdown rows (numbers + target) evaluate the expression
exactly (the last line or side of an equation that is one); answers that are
words of 3+ letters compare as words (case, \\text{} and a final period aside); other
answers go through math-verify, with a normalised exact match when math-verify
cannot parse them.
"""
from __future__ import annotations

import ast
import operator
import re
from collections import Counter
from fractions import Fraction

from rlt.data.formats import DataFormat


def _boxes(text: str):
    """Contents of the balanced \\boxed{...} in ``text``, last first (nested braces handled)."""
    start = len(text)
    while (start := text.rfind("\\boxed{", 0, start)) >= 0:
        i, depth = start + len("\\boxed{"), 1
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    yield text[i:j]
                    break


def last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} that is not empty, with nested braces (None without one)."""
    return next((b for b in _boxes(text) if b.strip()), None)


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
    t0, t1 = fmt.think_tags
    if t0 in text and t1 not in text:  # a run-on thought, whatever it holds
        return None
    section = solution_section(text.split(t1, 1)[1] if t1 in text else text, fmt)
    if section is None:
        after = text.split(t1, 1)[1] if t1 in text else text
        boxed = last_boxed(after)
        return boxed.strip() if boxed is not None else None
    body, closed = section
    boxed = last_boxed(body)
    if boxed is not None:
        return boxed.strip()
    return (body.strip() or None) if closed else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node, used: list[int]) -> Fraction:
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, used), _eval(node.right, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError("only integers and + - * / are allowed")


def _countdown_value(expr: str) -> tuple[Fraction, list[int]] | None:
    expr = expr.strip().strip("$").strip().rstrip(".").replace("\\left", "").replace("\\right", "")
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("·", "*"), ("\\div", "/"), ("÷", "/"),
                 ("{", "("), ("}", ")")):
        expr = expr.replace(a, b)
    try:
        used: list[int] = []
        return _eval(ast.parse(expr, mode="eval").body, used), used
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def check_countdown(expr: str | None, numbers: list[int], target: int) -> bool:
    """True if expr uses exactly the given numbers once each and equals target (exact arithmetic). The expression
    may be LaTeX (\\times, \\cdot, \\div, \\left/\\right, braces) and one side of an equation (``14 = (3+4)*2``);
    in a text of several lines (a whole solution section), any line that is such an expression counts."""
    if not expr:
        return False
    want = Counter(int(n) for n in numbers)
    lines = [line for line in expr.splitlines() if line.strip()]
    for line in reversed(lines):
        for side in line.split("="):
            got = _countdown_value(side)
            if got is not None and got[0] == Fraction(target) and Counter(got[1]) == want:
                return True
    return False


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.").lower()


_WORD = re.compile(r"[A-Za-z]{3,}(?:['-][A-Za-z]{3,})*")  # runs of 3+ letters: "xy", "a - b" stay algebra


def _words(s: str) -> str | None:
    """``s`` as lower-case words when it is only words of 3+ letters (\\text{...}, $...$ and a final period
    aside), else None."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s).strip().strip("$").strip().rstrip(".")
    tokens = s.split()
    return " ".join(t.lower() for t in tokens) if tokens and all(_WORD.fullmatch(t) for t in tokens) else None


def check_answer(pred: str | None, gold: str, numbers: list[int] | None = None, target: int | None = None) -> bool:
    if pred is None:
        return False
    if numbers is not None and target is not None:
        return check_countdown(pred, numbers, target)
    words, pred_words = _words(gold), _words(pred)
    if words and pred_words:  # not math: math-verify reads "listen" as a product of letters
        return pred_words == words
    from math_verify import parse, verify

    try:
        g, p = parse(f"${gold}$"), parse(f"${pred}$")
        if g and p:
            return bool(verify(g, p))
    except Exception:  # math-verify could not parse: fall back to exact match
        pass
    return _normalise(pred) == _normalise(gold)

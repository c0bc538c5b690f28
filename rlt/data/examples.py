"""Parsing dataset rows (Stratos or custom schema) into :class:`Example`."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Iterable, Sequence

from rlt.data.formats import QUESTION_COLUMNS, DataFormat
from rlt.errors import ConfigError

SKIP_HINT = "(set drop_bad_rows=true to skip such rows)"
logger = logging.getLogger(__name__)


class RowError(ConfigError):
    """A dataset row the format cannot parse; the message names the row."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One question with its solution and reasoning trace.

    thought: the reasoning trace, byte-exact (Stratos thoughts usually start
        and end with "\\n\\n").
    system: the row's own student system prompt, or None to use the format's.
    """

    question: str
    solution: str
    thought: str
    system: str | None = None


def _between(text: str, start: str, end: str, what: str) -> tuple[str, int]:
    """Content between the first ``start`` and the next ``end`` (non-greedy), and the end index."""
    m = re.search(re.escape(start) + r"(.*?)" + re.escape(end), text, flags=re.DOTALL)
    if m is None:
        missing = start if start not in text else end
        raise RowError(f"{what}: missing tag {missing!r}")
    return m.group(1), m.end()


def parse_stratos_row(row: dict[str, Any], fmt: DataFormat) -> Example:
    """A Stratos row: ``conversations`` holds one user turn (the question) and then one assistant turn
    (thought + solution), optionally after one system turn, which is the row's system prompt when the row has
    no ``system`` column value."""
    conv = row.get("conversations")
    if not conv:
        raise RowError("missing column 'conversations'")
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        raise RowError("'conversations' must be a list of {from, value} turns")
    roles = [t.get("from") for t in conv]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise RowError("'conversations' must be one user turn followed by one assistant turn (one system turn may "
                       f"come first); found {roles}")
    turns = conv[-2:]
    inline = conv[0].get("value") if len(conv) == 3 else None
    user, asst = turns
    question, text = user.get("value"), asst.get("value")
    if not isinstance(question, str) or not question.strip():
        raise RowError("the user turn is empty or not text")
    if not isinstance(text, str):
        raise RowError("the assistant turn is not text")
    thought, pos = _between(text, *fmt.think_tags, what="assistant turn")
    solution, _ = _between(text[pos:], *fmt.solution_tags, what="assistant turn after the thought")
    if not solution.strip():
        raise RowError("empty solution in the assistant turn")
    system = row.get("system")
    if not (isinstance(system, str) and system):
        system = inline
    return Example(question=question, solution=solution, thought=thought,
                   system=system if isinstance(system, str) and system else None)


def question_column(columns: Iterable[str]) -> str:
    """The question column of a custom dataset: 'question', else upstream's 'prompt', else 'problem' (MATH, AIME)."""
    cols = list(columns)
    for name in QUESTION_COLUMNS:
        if name in cols:
            return name
    raise RowError(f"custom data needs a 'question' (or 'prompt' or 'problem') column; found columns {cols}")


def parse_custom_row(row: dict[str, Any], qcol: str, fmt: DataFormat) -> Example:
    """A custom row; its thought (reasoning_trace, else the solution) is normalised to start and end with the
    format's padding, as Stratos thoughts do and as the RL prompt (which ends with the padding) expects."""
    question = row.get(qcol)
    if not isinstance(question, str) or not question.strip():
        raise RowError(f"empty, missing or non-text {qcol!r}")
    solution = row.get("solution")
    if not isinstance(solution, str) or not solution.strip():
        raise RowError("empty, missing or non-text 'solution'")
    trace = row.get("reasoning_trace")
    if trace is not None and not isinstance(trace, str):
        raise RowError("'reasoning_trace' must be text")
    thought = solution if not trace else trace
    pad = fmt.delimiter_padding
    thought = pad + thought.strip("\n") + pad if pad else thought
    system = row.get("system")
    return Example(question=question, solution=solution, thought=thought,
                   system=system if isinstance(system, str) and system else None)


def row_parser(fmt: DataFormat, columns: Iterable[str], source: str = "dataset") -> Callable[[dict], Example]:
    """The function that parses one row of ``fmt`` whose table has ``columns`` (raises :class:`RowError`)."""
    if fmt.row_schema == "stratos":
        return lambda row: parse_stratos_row(row, fmt)
    try:
        qcol = question_column(columns)
    except RowError as e:
        raise RowError(f"{source} (data_format={fmt.name}): {e}") from None
    logger.info("%s: custom format, questions read from column %r", source, qcol)
    return lambda row: parse_custom_row(row, qcol, fmt)


def row_place(i: int, lines: Sequence[int] | None) -> str:
    """Where row ``i`` is, for messages: its 1-based file line when ``lines`` is given, else its index."""
    return f"row {i}" if lines is None else f"line {lines[i]}"


def parse_rows(rows: Iterable[dict[str, Any]], fmt: DataFormat, *, source: str = "dataset",
               drop_bad_rows: bool = False, lines: Sequence[int] | None = None) -> list[Example]:
    """Parse every row; a bad row raises :class:`RowError` naming ``source`` and the row's index, or its
    1-based file line when ``lines`` (one per row, as read from a JSON-lines file) is given.

    With ``drop_bad_rows`` the bad rows are skipped and their count is logged.
    """
    rows = list(rows)
    if not rows:
        return []
    parse = row_parser(fmt, rows[0].keys(), source)
    out, bad = [], []
    for i, row in enumerate(rows):
        try:
            ex = parse(row)
        except RowError as e:
            where = row_place(i, lines)
            if not drop_bad_rows:
                raise RowError(f"{source}, {where}: {e} {SKIP_HINT}") from None
            bad.append(where)
            continue
        out.append(ex)
    if bad:
        logger.warning("%s: dropped %d unparseable row(s) (first: %s)", source, len(bad), ", ".join(bad[:10]))
    return out

"""Parsing dataset rows (Stratos or custom schema) into :class:`Example`."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Iterable

from rlt.data.formats import DataFormat

logger = logging.getLogger(__name__)

QUESTION_COLUMNS = ("question", "prompt")


class RowError(ValueError):
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
    conv = row.get("conversations")
    if not conv:
        raise RowError("missing column 'conversations'")
    user = next((t for t in conv if t.get("from") == "user"), None)
    asst = next((t for t in conv if t.get("from") == "assistant"), None)
    if user is None or not str(user.get("value", "")).strip():
        raise RowError("no non-empty user turn in 'conversations'")
    if asst is None:
        raise RowError("no assistant turn in 'conversations'")
    text = asst.get("value", "")
    thought, pos = _between(text, *fmt.think_tags, what="assistant turn")
    solution, _ = _between(text[pos:], *fmt.solution_tags, what="assistant turn after the thought")
    system = row.get("system")
    return Example(question=user["value"], solution=solution, thought=thought, system=system or None)


def question_column(columns: Iterable[str]) -> str:
    """The question column of a custom dataset: 'question', else upstream's 'prompt'."""
    cols = list(columns)
    for name in QUESTION_COLUMNS:
        if name in cols:
            return name
    raise RowError(f"custom data needs a 'question' (or 'prompt') column; found columns {cols}")


def parse_custom_row(row: dict[str, Any], qcol: str) -> Example:
    question = row.get(qcol)
    if question is None or not str(question).strip():
        raise RowError(f"empty or missing {qcol!r}")
    solution = row.get("solution")
    if solution is None or not str(solution).strip():
        raise RowError("empty or missing 'solution'")
    trace = row.get("reasoning_trace")
    thought = solution if trace is None or trace == "" else trace
    return Example(question=str(question), solution=str(solution), thought=str(thought), system=row.get("system") or None)


def parse_rows(rows: Iterable[dict[str, Any]], fmt: DataFormat, *, source: str = "dataset",
               drop_bad_rows: bool = False) -> list[Example]:
    """Parse every row; a bad row raises :class:`RowError` naming ``source`` and its index.

    With ``drop_bad_rows`` the bad rows are skipped and their count is logged.
    """
    rows = list(rows)
    qcol = None
    if fmt.row_schema == "custom":
        if not rows:
            return []
        qcol = question_column(rows[0].keys())
        logger.info("%s: custom format, questions read from column %r", source, qcol)
    out, bad = [], []
    for i, row in enumerate(rows):
        try:
            ex = parse_stratos_row(row, fmt) if fmt.row_schema == "stratos" else parse_custom_row(row, qcol)
        except RowError as e:
            if not drop_bad_rows:
                raise RowError(f"{source}, row {i}: {e} (set drop_bad_rows=true to skip such rows)") from None
            bad.append(i)
            continue
        out.append(ex)
    if bad:
        logger.warning("%s: dropped %d unparseable row(s) (first: %s)", source, len(bad), bad[:10])
    return out

"""Tag styles and the registry of data formats.

A *format* fixes how reasoning is wrapped in tags for the student
(thought/solution) and for the teacher (solution/explanation), plus the
delimiters around them and the default student system prompt.
"""
from __future__ import annotations

import dataclasses
import logging

from rlt.errors import ConfigError

logger = logging.getLogger(__name__)

TAG_STYLES = ("bespoke", "r1")

DEFAULT_STUDENT_SYSTEM_PROMPT = (
    "You are a careful problem solver. First reason about the question step by "
    "step inside the thought section, then state the final answer inside the "
    "solution section."
)

DEFAULT_TEACHER_SYSTEM_PROMPT = (
    "You are a teacher who already knows the answer. Write the solution first, "
    "inside the solution tags. Then, inside the explanation tags, walk a student "
    "through how one reaches that solution: short steps that build on each "
    "other, separated by blank lines, without skipping the reasoning a "
    "learner would need."
)


_TAG_TEMPLATES = {"bespoke": ("<|begin_of_{}|>", "<|end_of_{}|>"), "r1": ("<{}>", "</{}>")}


def tag_pair(name: str, style: str) -> tuple[str, str]:
    """(opening, closing) tag for ``name``: bespoke <|begin_of_X|> / <|end_of_X|>, r1 <X> / </X>."""
    if style not in _TAG_TEMPLATES:
        raise ValueError(f"unknown tag style {style!r}; expected one of {TAG_STYLES}")
    start, end = _TAG_TEMPLATES[style]
    return start.format(name), end.format(name)


def start_tag(name: str, style: str) -> str:
    return tag_pair(name, style)[0]


def end_tag(name: str, style: str) -> str:
    return tag_pair(name, style)[1]


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """How student and teacher texts are tagged.

    row_schema: "stratos" (system + conversations) or "custom" (question/prompt,
        solution, optional reasoning_trace columns).
    """

    name: str
    row_schema: str = "custom"
    tag_style: str = "bespoke"
    think_tag: str = "thought"
    solution_tag: str = "solution"
    explanation_tag: str = "explanation"
    think_prefix: str = ""
    think_solution_delimiter: str = "\n\n"
    delimiter_padding: str = "\n\n"
    student_system_prompt: str = DEFAULT_STUDENT_SYSTEM_PROMPT
    teacher_system_prompt: str = DEFAULT_TEACHER_SYSTEM_PROMPT

    def __post_init__(self):
        if self.tag_style not in TAG_STYLES:
            raise ValueError(f"data format {self.name!r}: tag_style must be one of {TAG_STYLES}, got {self.tag_style!r}")
        if self.row_schema not in ("stratos", "custom"):
            raise ValueError(f"data format {self.name!r}: row_schema must be 'stratos' or 'custom', got {self.row_schema!r}")

    def tags(self, name: str) -> tuple[str, str]:
        return tag_pair(name, self.tag_style)

    @property
    def think_tags(self) -> tuple[str, str]:
        return self.tags(self.think_tag)

    @property
    def solution_tags(self) -> tuple[str, str]:
        return self.tags(self.solution_tag)

    @property
    def explanation_tags(self) -> tuple[str, str]:
        return self.tags(self.explanation_tag)


FORMATS: dict[str, DataFormat] = {
    "bespoke_stratos": DataFormat(name="bespoke_stratos", row_schema="stratos", tag_style="bespoke"),
    "custom": DataFormat(name="custom", row_schema="custom", tag_style="bespoke"),
    "custom_r1": DataFormat(name="custom_r1", row_schema="custom", tag_style="r1", think_tag="think", solution_tag="answer"),
}

QUESTION_COLUMNS = ("question", "prompt", "problem")  # a custom row's question: the first of these it has


def detect_format(columns, source: str = "dataset") -> str:
    """The format name of rows with these columns: conversations -> bespoke_stratos; a question column
    (QUESTION_COLUMNS) with a solution column -> custom. Anything else is an error naming them."""
    cols = set(columns)
    if "conversations" in cols:
        return "bespoke_stratos"
    if cols & set(QUESTION_COLUMNS) and "solution" in cols:
        return "custom"
    raise ConfigError(f"{source}: cannot tell the data format from its columns {sorted(cols)}: Stratos rows have "
                     "'conversations', custom rows 'question' (or 'prompt' or 'problem') and 'solution'; fix the "
                     f"data or set data_format to one of {sorted(FORMATS)}")


def resolve_format(data_format: str | None = "auto", columns=None, source: str = "dataset", **overrides) -> DataFormat:
    """A format by name, or with ``data_format`` auto/None detected from the rows' ``columns``
    (no columns: the custom format, whose tags are the Stratos ones).

    ``overrides`` replace fields of the registered format (e.g. a custom
    ``student_system_prompt``); None values are ignored.
    """
    if data_format in (None, "auto"):
        name = "custom" if columns is None else detect_format(columns, source)
        if columns is not None:
            logger.info("data_format=auto: %s has Stratos rows" if name == "bespoke_stratos"
                        else "data_format=auto: %s has custom rows", source)
    else:
        name = data_format
    if name not in FORMATS:
        raise ConfigError(f"unknown data_format {name!r}; known formats: {sorted(FORMATS)} (or 'auto')")
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(fields) - {f.name for f in dataclasses.fields(DataFormat)}
    if unknown:
        raise ValueError(f"unknown data format field(s) {sorted(unknown)}")
    return dataclasses.replace(FORMATS[name], **fields)

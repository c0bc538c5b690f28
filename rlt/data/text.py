"""Rendering teacher and student texts through the tokenizer's chat template.

Teacher text: [system: teacher prompt, user: question, assistant:
  <sol>solution</sol> + delimiter + <expl>thought</expl>].
RL prompt: the teacher text cut right after <expl> + padding.
Student text: [system: student prompt, user: question, assistant:
  think_prefix + <think>thought</think> + delimiter + <sol>solution</sol>].
"""
from __future__ import annotations

import jinja2

from rlt.data.examples import Example
from rlt.data.formats import DataFormat
from rlt.errors import ConfigError


def _chat(tokenizer, system: str, question: str, answer: str | None) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    except jinja2.TemplateError as e:  # a template's raise_exception(...) (e.g. no system role), or a broken one
        raise ConfigError(f"the chat template of {_name(tokenizer)} refused a system + user + assistant "
                          f"conversation ({type(e).__name__}: {str(e)[:200]}); rlt needs a template that takes a "
                          "system turn") from None


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or "the tokenizer"


def _check_verbatim(tokenizer, full: str, start: int, answer: str) -> None:
    if not full.startswith(answer, start):
        got = full[start:start + 60]
        raise ConfigError(f"the chat template of {_name(tokenizer)} alters the assistant's content (it renders "
                          f"{got!r}... where {answer[:40]!r}... was given, e.g. a template that adds an empty think "
                          "block); rlt needs the content verbatim: use a model or chat template that keeps it")


def teacher_answer(solution: str, thought: str, fmt: DataFormat) -> str:
    s0, s1 = fmt.solution_tags
    e0, e1 = fmt.explanation_tags
    return s0 + solution + s1 + fmt.think_solution_delimiter + e0 + thought + e1


def student_answer(thought: str, solution: str, fmt: DataFormat) -> str:
    t0, t1 = fmt.think_tags
    s0, s1 = fmt.solution_tags
    return fmt.think_prefix + t0 + thought + t1 + fmt.think_solution_delimiter + s0 + solution + s1


def render_teacher_text(tokenizer, ex: Example, fmt: DataFormat) -> str:
    return _chat(tokenizer, fmt.teacher_system_prompt, ex.question, teacher_answer(ex.solution, ex.thought, fmt))


def student_system(ex_system: str | None, fmt: DataFormat) -> str:
    return ex_system if ex_system else fmt.student_system_prompt


def render_student_text(tokenizer, question: str, thought: str, solution: str, system: str | None,
                        fmt: DataFormat) -> str:
    return _chat(tokenizer, student_system(system, fmt), question, student_answer(thought, solution, fmt))


def render_student_prompt(tokenizer, question: str, system: str | None, fmt: DataFormat) -> str:
    """What a student sees at test time (generation prompt, nothing answered yet)."""
    return _chat(tokenizer, student_system(system, fmt), question, None)


def _assistant_start(tokenizer, fmt: DataFormat, ex: Example) -> int:
    """Index where the assistant content starts in the rendered teacher text."""
    head = _chat(tokenizer, fmt.teacher_system_prompt, ex.question, None)
    return len(head)


def teacher_prompt(tokenizer, question: str, solution: str, fmt: DataFormat) -> str:
    """The RL prompt: teacher text up to and including <expl> + padding (independent of any thought)."""
    ex = Example(question=question, solution=solution, thought=fmt.delimiter_padding)
    return teacher_prompt_and_completion(tokenizer, ex, fmt)[0]


def teacher_prompt_and_completion(tokenizer, ex: Example, fmt: DataFormat) -> tuple[str, str]:
    """Split the teacher text into (RL prompt, explanation completion).

    The completion runs through the end-of-turn token of the assistant turn
    (the trailing newline some templates add after it is dropped). When the
    thought does not begin with the padding, the prompt ends right after the
    explanation start tag and the padding is not assumed.
    """
    full = render_teacher_text(tokenizer, ex, fmt)
    start = _assistant_start(tokenizer, fmt, ex)
    answer = teacher_answer(ex.solution, ex.thought, fmt)
    _check_verbatim(tokenizer, full, start, answer)
    s0, s1 = fmt.solution_tags
    cut = start + len(s0 + ex.solution + s1 + fmt.think_solution_delimiter + fmt.explanation_tags[0])
    if full.startswith(fmt.delimiter_padding, cut):
        cut += len(fmt.delimiter_padding)
    end = start + len(answer)
    eos = tokenizer.eos_token or ""
    if eos and full.startswith(eos, end):
        end += len(eos)
    return full[:cut], full[cut:end]


def student_text_with_spans(tokenizer, question: str, thought: str, solution: str, system: str | None,
                            fmt: DataFormat) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Student text and the character spans [start, end) of the thought and the solution content."""
    text = render_student_text(tokenizer, question, thought, solution, system, fmt)
    head = len(render_student_prompt(tokenizer, question, system, fmt))
    answer = student_answer(thought, solution, fmt)
    _check_verbatim(tokenizer, text, head, answer)
    t0 = head + len(fmt.think_prefix) + len(fmt.think_tags[0])
    s0 = t0 + len(thought) + len(fmt.think_tags[1]) + len(fmt.think_solution_delimiter) + len(fmt.solution_tags[0])
    return text, (t0, t0 + len(thought)), (s0, s0 + len(solution))


def stratos_row(question: str, thought: str, solution: str, system: str, fmt: DataFormat, **extra) -> dict:
    """A Stratos-format row (system + conversations); its student text is render_student_text of the same parts."""
    return {"system": system, "conversations": [{"from": "user", "value": question},
                                                 {"from": "assistant", "value": student_answer(thought, solution, fmt)}],
            **extra}


def end_of_turn(tokenizer, fmt: DataFormat) -> str:
    """What the chat template writes right after the assistant's content (up to the newline some add): the
    end-of-turn text a model trained on these texts learns to write."""
    ex = Example(question="q", solution="s", thought="t")
    full, start = render_teacher_text(tokenizer, ex, fmt), _assistant_start(tokenizer, fmt, ex)
    answer = teacher_answer(ex.solution, ex.thought, fmt)
    _check_verbatim(tokenizer, full, start, answer)
    return full[start + len(answer):].split("\n", 1)[0]


def check_student_eos(tokenizer, name: str) -> None:
    """Student SFT ends each answer with ``eos_token`` (the token generation stops on); a tokenizer without one
    would train a student that never stops: one line naming tokenizer ``name``."""
    if not tokenizer.eos_token:
        raise ConfigError(f"tokenizer of {name} has no eos_token: a student trained with it would never learn to "
                          "stop; use a tokenizer that has one (an instruct model's)")


def check_end_of_turn(tokenizer, fmt: DataFormat, name: str) -> None:
    """The chat template ends the assistant's turn with ``eos_token``: the token SFT teaches the model to end
    with (teacher and student alike) and the one generation stops on. Else one line naming tokenizer ``name``:
    e.g. a base model's tokenizer (eos <|endoftext|>) with an instruct chat template (turns end <|im_end|>)
    would train a teacher that never stops."""
    eot, eos = end_of_turn(tokenizer, fmt), tokenizer.eos_token or ""
    if eos and eot.startswith(eos):
        return
    ends = f"ends the assistant's turn with {eot!r}" if eot else "writes nothing after the assistant's turn"
    raise ConfigError(f"tokenizer of {name}: its chat template {ends}, but its eos_token is {eos or None!r}; rlt "
                      "trains models to end with eos_token and stops generation there: use a tokenizer whose "
                      "template ends turns with its eos_token (an instruct model's)")

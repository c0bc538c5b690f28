"""Format parsing and rendering, byte-exact against hand-written strings."""
import pytest

from rlt.data.examples import Example, RowError, parse_rows
from rlt.data.formats import resolve_format, start_tag, end_tag
from rlt.data.text import (render_student_text, render_teacher_text, student_answer, teacher_answer,
                           teacher_prompt_and_completion)

Q = "What is 2+3?"
THOUGHT = "\n\nAdd 2 and 3.\n\n"
SOL = "\n\n\\boxed{5}\n\n"


def test_tag_styles():
    assert (start_tag("thought", "bespoke"), end_tag("thought", "bespoke")) == ("<|begin_of_thought|>", "<|end_of_thought|>")
    assert (start_tag("think", "r1"), end_tag("think", "r1")) == ("<think>", "</think>")
    with pytest.raises(ValueError, match="tag style"):
        start_tag("x", "xml")


def test_format_registry_and_auto_detection_from_columns():
    assert resolve_format("auto", ["system", "conversations"]).name == "bespoke_stratos"
    assert resolve_format("auto", ["question", "solution", "reasoning_trace"]).name == "custom"
    assert resolve_format(None, ["prompt", "solution"]).name == "custom"
    assert resolve_format("auto").name == "custom"  # no rows to look at: the Stratos tags
    with pytest.raises(ValueError, match=r"x.jsonl: cannot tell the data format from its columns \['text'\]"):
        resolve_format("auto", ["text"], source="x.jsonl")
    with pytest.raises(ValueError, match="unknown data_format 'nope'"):
        resolve_format("nope")
    assert resolve_format("custom", student_system_prompt="S").student_system_prompt == "S"


def test_answers_bespoke_and_r1():
    b = resolve_format("bespoke_stratos")
    assert student_answer(THOUGHT, SOL, b) == (
        "<|begin_of_thought|>\n\nAdd 2 and 3.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>")
    assert teacher_answer(SOL, THOUGHT, b) == (
        "<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\nAdd 2 and 3.\n\n<|end_of_explanation|>")
    r1 = resolve_format("custom_r1")
    assert student_answer(THOUGHT, SOL, r1) == "<think>\n\nAdd 2 and 3.\n\n</think>\n\n<answer>\n\n\\boxed{5}\n\n</answer>"
    assert teacher_answer(SOL, THOUGHT, r1) == "<answer>\n\n\\boxed{5}\n\n</answer>\n\n<explanation>\n\nAdd 2 and 3.\n\n</explanation>"


def test_teacher_and_student_text(tokenizer):
    fmt = resolve_format("bespoke_stratos", teacher_system_prompt="TEACH")
    ex = Example(question=Q, solution=SOL, thought=THOUGHT, system="STUDENT")
    head = "<|im_start|>system\nTEACH<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    teacher = (head + "<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>"
               "\n\nAdd 2 and 3.\n\n<|end_of_explanation|><|im_end|>\n")
    assert render_teacher_text(tokenizer, ex, fmt) == teacher
    prompt, completion = teacher_prompt_and_completion(tokenizer, ex, fmt)
    assert prompt == head + "<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"
    assert completion == "Add 2 and 3.\n\n<|end_of_explanation|><|im_end|>"
    student = ("<|im_start|>system\nSTUDENT<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
               "<|begin_of_thought|>\n\nAdd 2 and 3.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n\\boxed{5}\n\n"
               "<|end_of_solution|><|im_end|>\n")
    assert render_student_text(tokenizer, Q, THOUGHT, SOL, "STUDENT", fmt) == student
    # no row system prompt -> the format's default
    assert "<|im_start|>system\nDEF<|im_end|>" in render_student_text(
        tokenizer, Q, THOUGHT, SOL, None, resolve_format("bespoke_stratos", student_system_prompt="DEF"))


def test_thought_without_padding_keeps_whole_thought_in_completion(tokenizer):
    fmt = resolve_format("custom", teacher_system_prompt="T")
    prompt, completion = teacher_prompt_and_completion(tokenizer, Example(Q, "5", "add them"), fmt)
    assert prompt.endswith("<|end_of_solution|>\n\n<|begin_of_explanation|>")
    assert completion == "add them<|end_of_explanation|><|im_end|>"


def test_parse_stratos_rows_byte_exact():
    fmt = resolve_format("bespoke_stratos")
    row = {"system": "SYS", "conversations": [
        {"from": "user", "value": Q},
        {"from": "assistant", "value": "<|begin_of_thought|>" + THOUGHT + "<|end_of_thought|>\n\n<|begin_of_solution|>"
         + SOL + "<|end_of_solution|>"}]}
    [ex] = parse_rows([row], fmt)
    assert ex == Example(question=Q, solution=SOL, thought=THOUGHT, system="SYS")


def test_parse_r1_rows():
    fmt = resolve_format("custom_r1")
    [ex] = parse_rows([{"question": Q, "solution": "5", "reasoning_trace": "<no tags needed>"}], fmt)
    assert ex == Example(Q, "5", "\n\n<no tags needed>\n\n", None)  # normalised to the padding


def test_parse_custom_rows_question_and_prompt_columns(caplog):
    fmt = resolve_format("custom")
    [a] = parse_rows([{"question": Q, "solution": SOL, "reasoning_trace": THOUGHT}], fmt)
    assert a == Example(Q, SOL, THOUGHT, None)
    with caplog.at_level("INFO"):
        [b] = parse_rows([{"prompt": Q, "solution": SOL}], fmt, source="up.jsonl")
    assert b.thought == SOL  # thought defaults to the solution
    assert "column 'prompt'" in caplog.text


@pytest.mark.parametrize("row,msg", [
    ({"conversations": [{"from": "user", "value": Q}, {"from": "assistant", "value": "no tags"}]}, "row 1: assistant turn: missing tag '<|begin_of_thought|>'"),
    ({"conversations": [{"from": "user", "value": Q}, {"from": "assistant", "value": "<|begin_of_thought|>x<|end_of_thought|>"}]}, "row 1: assistant turn after the thought: missing tag '<|begin_of_solution|>'"),
    ({"conversations": [{"from": "user", "value": "  "}, {"from": "assistant", "value": "x"}]}, "row 1: the user turn is empty"),
    ({"conversations": [{"from": "assistant", "value": "x"}, {"from": "user", "value": Q}]},
     "row 1: 'conversations' must be one user turn followed by one assistant turn (one system turn may come "
     "first); found ['assistant', 'user']"),
    ({"conversations": [{"from": "user", "value": Q}]}, "row 1: 'conversations' must be one user turn followed by one "
     "assistant turn (one system turn may come first); found ['user']"),
    ({"conversations": "text"}, "row 1: 'conversations' must be a list"),
    ({"system": "s"}, "row 1: missing column 'conversations'"),
])
def test_bad_stratos_rows_name_the_row(row, msg):
    fmt = resolve_format("bespoke_stratos")
    good = {"conversations": [{"from": "user", "value": Q}, {"from": "assistant", "value":
            "<|begin_of_thought|>a<|end_of_thought|>\n\n<|begin_of_solution|>b<|end_of_solution|>"}]}
    with pytest.raises(RowError) as e:
        parse_rows([good, row], fmt, source="data.jsonl")
    assert f"data.jsonl, {msg}" in str(e.value)
    kept = parse_rows([good, row, good], fmt, drop_bad_rows=True)
    assert len(kept) == 2


def test_bad_custom_rows():
    fmt = resolve_format("custom")
    with pytest.raises(RowError, match="row 1: empty, missing or non-text 'solution'"):
        parse_rows([{"question": "a", "solution": "b"}, {"question": "c", "solution": ""}], fmt)
    with pytest.raises(RowError, match="needs a 'question' \\(or 'prompt' or 'problem'\\) column"):
        parse_rows([{"text": "a"}], fmt)
    [ex] = parse_rows([{"problem": "What is 1+1?", "solution": "\\boxed{2}"}], fmt)  # MATH-500 / AIME columns
    assert ex.question == "What is 1+1?"


@pytest.mark.parametrize("trace", ["Add 2 and 3.", "\nAdd 2 and 3.", "\n\nAdd 2 and 3.\n\n", None])
def test_custom_rows_give_sft_the_rl_prompt(tokenizer, trace):
    """Custom rows with or without the padding: the SFT prompt/completion split is the RL prompt."""
    from rlt.data.text import teacher_prompt

    fmt = resolve_format("custom")
    row = {"question": Q, "solution": "The sum is \\boxed{5}."}
    if trace is not None:
        row["reasoning_trace"] = trace
    [ex] = parse_rows([row], fmt)
    prompt, completion = teacher_prompt_and_completion(tokenizer, ex, fmt)
    assert prompt == teacher_prompt(tokenizer, ex.question, ex.solution, fmt)
    body = "Add 2 and 3." if trace is not None else row["solution"]
    assert completion == body + "\n\n" + fmt.explanation_tags[1] + tokenizer.eos_token


def test_rl_prompts_are_tokenized_without_a_second_bos(tokenizer):
    """Rendered prompts hold their template's BOS: with a tokenizer that adds one (Llama 3 style), trl's text path
    would put a second in front of every rollout; the teacher trainer tokenizes them as SFT and the reward do."""
    import copy
    from types import SimpleNamespace

    from tokenizers.processors import TemplateProcessing
    from trl import GRPOTrainer

    from rlt.trainers.teacher_grpo import TeacherGRPOTrainer

    bos_tok = copy.deepcopy(tokenizer)
    bos = bos_tok.convert_tokens_to_ids("<|fim_pad|>")
    bos_tok._tokenizer.post_processor = TemplateProcessing(single="<|fim_pad|> $A",
                                                           special_tokens=[("<|fim_pad|>", bos)])
    prompts = ["<|fim_pad|>ab", "c"]
    plain = [bos_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert plain[0][0] == bos and plain[0].count(bos) == 1
    trainer = SimpleNamespace(processing_class=bos_tok, _is_vlm=False)
    assert GRPOTrainer._tokenize_prompts(trainer, prompts)[0][0][:2] == [bos, bos]  # what trl alone would do
    assert TeacherGRPOTrainer._tokenize_prompts(trainer, prompts) == (plain, None, {})


def test_a_template_that_ends_turns_with_another_token_than_eos_is_refused(tiny_path):
    """A base model's tokenizer (eos <|endoftext|>) under an instruct template (turns end <|im_end|>) would train
    a teacher that never writes the token generation stops on."""
    from transformers import AutoTokenizer

    from rlt.data.text import check_end_of_turn, end_of_turn
    from rlt.errors import ConfigError

    fmt = resolve_format("bespoke_stratos")
    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert end_of_turn(tok, fmt) == "<|im_end|>"
    check_end_of_turn(tok, fmt, "tiny")   # eos is the end of turn: accepted
    base = AutoTokenizer.from_pretrained(tiny_path, eos_token="<|endoftext|>")
    with pytest.raises(ConfigError, match=r"tokenizer of base-model: its chat template ends the assistant's turn "
                                          r"with '<\|im_end\|>', but its eos_token is '<\|endoftext\|>'"):
        check_end_of_turn(base, fmt, "base-model")
    bare = AutoTokenizer.from_pretrained(tiny_path)
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="writes nothing after the assistant's turn"):
        check_end_of_turn(bare, fmt, "bare")


def test_student_sft_needs_an_eos_token(tiny_path):
    """The student's answers end with eos_token; without one it would never learn to stop."""
    from transformers import AutoTokenizer

    from rlt.data.text import check_student_eos
    from rlt.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(tiny_path)
    check_student_eos(tok, "tiny")
    tok.eos_token = None
    with pytest.raises(ConfigError, match=r"^tokenizer of tiny has no eos_token: a student trained with it would "):
        check_student_eos(tok, "tiny")

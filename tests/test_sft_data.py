"""The teacher SFT label mask on real token ids."""
from rlt.data.examples import Example
from rlt.data.formats import resolve_format
from rlt.data.loading import load_examples
from rlt.data.text import render_teacher_text, teacher_prompt_and_completion
from rlt.trainers.sft import IGNORE_INDEX, build_sft_dataset, tokenize_teacher_example


def first_loss_token(row) -> int:
    return next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)


def test_first_unmasked_token_is_first_explanation_token(tokenizer):
    fmt = resolve_format("bespoke_stratos")
    ex = Example("What is 2+3?", "\n\n\\boxed{5}\n\n", "\n\nAdd 2 and 3.\n\n<|x", "s")
    row = tokenize_teacher_example(tokenizer, ex, fmt)
    first = first_loss_token(row)
    # everything before is the prompt, which ends with the explanation tag + padding
    assert tokenizer.decode(row["input_ids"][:first]).endswith("<|begin_of_explanation|>\n\n")
    first_text = tokenizer.decode(row["input_ids"][first:first + 1])
    assert first_text and "Add 2 and 3.".startswith(first_text)
    # the loss runs through the end-of-turn token
    assert row["labels"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert row["labels"][first:] == row["input_ids"][first:]


def test_boundary_is_exact_where_bpe_merges_across_it(tokenizer):
    """In the joint text "|>\\n\\n" and the following text can merge; the split
    tokenization keeps the boundary on a token boundary and decodes losslessly."""
    fmt = resolve_format("bespoke_stratos")
    for ex in load_examples("rlt-countdown:20:1", fmt):
        prompt, completion = teacher_prompt_and_completion(tokenizer, ex, fmt)
        row = tokenize_teacher_example(tokenizer, ex, fmt)
        n_prompt = row["labels"].count(IGNORE_INDEX)
        assert tokenizer.decode(row["input_ids"]) == prompt + completion
        assert tokenizer.decode(row["input_ids"][:n_prompt]) == prompt
        assert tokenizer.decode(row["input_ids"][n_prompt:]) == completion
        assert render_teacher_text(tokenizer, ex, fmt).startswith(prompt + completion)
    joint = tokenizer("<|begin_of_explanation|>\n\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(joint)[-1] == "|>ĊĊ"  # the merge the split guards against


def test_long_rows_dropped_with_count(tokenizer, caplog):
    fmt = resolve_format("bespoke_stratos")
    exs = load_examples("rlt-countdown:4:0", fmt) + [Example("q" * 10, "s", "t" * 3000)]
    with caplog.at_level("WARNING"):
        ds = build_sft_dataset(tokenizer, exs, fmt, max_length=400)
    assert len(ds) == 4 and "dropped 1 of 5" in caplog.text


def test_teacher_thoughts_without_the_padding_are_counted(tokenizer, caplog):
    """A Stratos thought kept byte-exact that does not start with the padding: its SFT prompt ends at the tag, not
    where the RL prompt ends; said with a count (none in the embedded data)."""
    fmt = resolve_format("bespoke_stratos")
    exs = load_examples("rlt-countdown:4:0", fmt)
    with caplog.at_level("WARNING"):
        build_sft_dataset(tokenizer, exs, fmt, max_length=None)
    assert "padding" not in caplog.text
    with caplog.at_level("WARNING"):
        build_sft_dataset(tokenizer, exs + [Example("q", "s", "\nOkay, so\n")], fmt, max_length=None)
    assert "1 of 5 teacher examples have a thought that does not start with the padding" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_sft_dataset(tokenizer, [Example("q", "s", "\nOkay, so\n")], fmt, max_length=None, student=True)
    assert "padding" not in caplog.text   # the student's text has no RL prompt


def test_student_labels_cover_the_whole_assistant_turn(tokenizer):
    from rlt.trainers.sft import tokenize_student_example

    fmt = resolve_format("bespoke_stratos")
    ex = Example("What is 2+3?", "\n\n\\boxed{5}\n\n", "\n\nAdd 2 and 3.\n\n", "S")
    row = tokenize_student_example(tokenizer, ex, fmt)
    first = first_loss_token(row)
    assert tokenizer.decode(row["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row["input_ids"][first:]) == (
        "<|begin_of_thought|>\n\nAdd 2 and 3.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n\\boxed{5}\n\n"
        "<|end_of_solution|><|im_end|>")

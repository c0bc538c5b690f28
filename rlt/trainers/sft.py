"""Teacher SFT warm-up on trl's SFTTrainer, loss only on the explanation.

Each example is tokenized as tokens(RL prompt) + tokens(explanation), the
same split the RL stage sees (the prompt is tokenized alone, the teacher
continues after it), so the loss boundary sits exactly on a token boundary
even where BPE would merge across it in the joint text. Labels are -100 on
the prompt (system, question, solution, explanation start tag + padding).
"""
from __future__ import annotations

import logging

from rlt.data.examples import Example
from rlt.data.formats import DataFormat
from rlt.data.text import render_student_prompt, student_answer, teacher_prompt_and_completion

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def _prompt_completion(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """tokens(prompt) + tokens(completion), labels -100 on the prompt."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


def tokenize_teacher_example(tokenizer, ex: Example, fmt: DataFormat) -> dict[str, list[int]]:
    """input_ids and labels (-100 before the first explanation token)."""
    return _prompt_completion(tokenizer, *teacher_prompt_and_completion(tokenizer, ex, fmt))


def tokenize_student_example(tokenizer, ex: Example, fmt: DataFormat) -> dict[str, list[int]]:
    """Student SFT: loss on the whole assistant turn (think prefix through end of turn)."""
    prompt = render_student_prompt(tokenizer, ex.question, ex.system, fmt)
    return _prompt_completion(tokenizer, prompt, student_answer(ex.thought, ex.solution, fmt) + tokenizer.eos_token)


def build_sft_dataset(tokenizer, examples: list[Example], fmt: DataFormat, max_length: int | None,
                      student: bool = False):
    """A `datasets.Dataset` of input_ids/labels; rows longer than max_length are dropped (count logged)."""
    import datasets

    from rlt.data.loading import drop_longer

    fn = tokenize_student_example if student else tokenize_teacher_example
    pad = fmt.delimiter_padding
    off = 0 if student or not pad else sum(not ex.thought.startswith(pad) for ex in examples)
    if off:   # Stratos thoughts are kept byte-exact; custom ones are padded when parsed
        logger.warning("%d of %d teacher examples have a thought that does not start with the padding %r: their SFT "
                       "prompt ends at the explanation tag, while the RL prompt (and distillation's) ends with the "
                       "padding", off, len(examples), pad)
    rows = datasets.Dataset.from_list([fn(tokenizer, ex, fmt) for ex in examples])
    return drop_longer(rows, lambda r: len(r["input_ids"]), max_length, "example", "max_length")


def make_sft_trainer(model, tokenizer, args, train_dataset, peft_config=None):
    """trl SFTTrainer over a pre-tokenized dataset (trl's preparation is skipped)."""
    from trl import SFTTrainer

    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    args.remove_unused_columns = False
    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                      peft_config=peft_config)


def run_sft(s, examples=None, fmt=None) -> None:
    """Teacher (or student) SFT from typed settings (:class:`rlt.config.TrainSettings`);
    ``examples``/``fmt`` when already loaded."""
    from rlt.data.loading import load_dataset_examples
    from rlt.models import load_causal_lm, load_tokenizer, peft_config
    from rlt.runs import save_composed_config, train_and_save

    student = s.run.trainer == "student_sft"
    args = s.args
    if examples is None:
        examples, fmt = load_dataset_examples(s.data, s.format)
    save_composed_config(s.composed, args.output_dir, args.process_index == 0)
    tokenizer = load_tokenizer(s.model.require_model())
    if not student:   # the student's completion ends with eos_token itself (tokenize_student_example)
        from rlt.data.text import check_end_of_turn

        check_end_of_turn(tokenizer, fmt, s.model.model_name_or_path)   # before the model loads
    else:
        from rlt.data.text import check_student_eos

        check_student_eos(tokenizer, s.model.model_name_or_path)
    with args.main_process_first(desc="tokenizing"):
        dataset = build_sft_dataset(tokenizer, examples, fmt, args.max_length, student=student)
    logger.info("%s SFT on %d examples; gradient_accumulation_steps=%d",
                "student" if student else "teacher", len(dataset), args.gradient_accumulation_steps)
    model = load_causal_lm(s.model.model_name_or_path, s.model.dtype, s.model.attn_implementation)
    trainer = make_sft_trainer(model, tokenizer, args, dataset, peft_config(s.lora))
    train_and_save(trainer, tokenizer, s.run, args.output_dir)

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
    return _prompt_completion(tokenizer, prompt, student_answer(ex.thought, ex.solution, fmt) + (tokenizer.eos_token or ""))


def build_sft_dataset(tokenizer, examples: list[Example], fmt: DataFormat, max_length: int | None,
                      student: bool = False):
    """A `datasets.Dataset` of input_ids/labels; rows longer than max_length are dropped (count logged)."""
    import datasets

    fn = tokenize_student_example if student else tokenize_teacher_example
    rows, dropped = [], 0
    for ex in examples:
        row = fn(tokenizer, ex, fmt)
        if max_length is not None and len(row["input_ids"]) > max_length:
            dropped += 1
            continue
        rows.append(row)
    if dropped:
        logger.warning("dropped %d of %d examples longer than max_length=%s tokens", dropped, len(examples), max_length)
    if not rows:
        raise ValueError(f"no example fits max_length={max_length}; raise max_length")
    return datasets.Dataset.from_list(rows)


def make_sft_trainer(model, tokenizer, args, train_dataset):
    """trl SFTTrainer over a pre-tokenized dataset (trl's preparation is skipped)."""
    from trl import SFTTrainer

    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    args.remove_unused_columns = False
    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)


def run_sft(cfg: dict, student: bool = False) -> None:
    """Teacher (or student) SFT from a composed config."""
    from trl import SFTConfig

    from rlt.config import build_args
    from rlt.data.formats import resolve_format
    from rlt.data.loading import load_examples
    from rlt.models import load_causal_lm, load_tokenizer
    from rlt.train import save_composed_config, train_and_save

    rlt_cfg, args = build_args(cfg, SFTConfig)
    save_composed_config(cfg, args.output_dir)
    fmt = resolve_format(rlt_cfg["data_format"], rlt_cfg["dataset_id_or_path"],
                         student_system_prompt=rlt_cfg.get("student_system_prompt"),
                         teacher_system_prompt=rlt_cfg.get("teacher_system_prompt"))
    tokenizer = load_tokenizer(rlt_cfg["model_name_or_path"])
    examples = load_examples(rlt_cfg["dataset_id_or_path"], fmt, rlt_cfg["dataset_split"],
                             drop_bad_rows=rlt_cfg["drop_bad_rows"], max_samples=rlt_cfg["max_samples"])
    with args.main_process_first(desc="tokenizing"):
        dataset = build_sft_dataset(tokenizer, examples, fmt, args.max_length, student=student)
    logger.info("%s SFT on %d examples; gradient_accumulation_steps=%d",
                "student" if student else "teacher", len(dataset), args.gradient_accumulation_steps)
    model = load_causal_lm(rlt_cfg["model_name_or_path"], rlt_cfg["dtype"], rlt_cfg["attn_implementation"])
    trainer = make_sft_trainer(model, tokenizer, args, dataset)
    train_and_save(trainer, tokenizer, rlt_cfg, args.output_dir)

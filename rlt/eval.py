"""Accuracy of a (student) model on a question/answer dataset.

    python -m rlt.eval model=PATH dataset=ID_OR_FILE output_dir=DIR [n_samples=1] [temperature=0.0]
        [max_completion_length=16384] [dataset_split=train] [max_samples=N] [data_format=auto]
        [vllm_local_servers=N | vllm_host=HOST vllm_port=8765]   (default: vLLM's offline engine, one GPU)
    python -m rlt.eval --help      # every key with its default

Rows of any supported format: Stratos rows (system + conversations) take the
gold answer from the last \\boxed{} of their solution; custom rows from an
`answer` column, else the last \\boxed{} of their `solution`; a benchmark's
plain question/answer rows (a question column, `answer`, no `solution`, e.g.
MATH-500's or AIME's `problem` + `answer`) from `answer`; Countdown rows
(`numbers`, `target`) are checked by evaluating the expression exactly. The
model sees the student system prompt (the row's `system`, else the format's).
A prediction is the last \\boxed{} of the output's solution section, else the
whole solution section when the output closed one; otherwise it is counted as
no answer. Writes DIR/results.jsonl (one row per question) and DIR/summary.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import field
from pathlib import Path

from rlt.cli import check_writable, refuse_directories, user_errors
from rlt.config import compose_tool
from rlt.data.config import DataConfig, FormatConfig
from rlt.errors import ConfigError
from rlt.generation.config import RolloutConfig
from rlt.logging_utils import setup_logging
from rlt.models import ModelConfig

logger = logging.getLogger("rlt.eval")


@dataclasses.dataclass
class EvalConfig:
    """How to sample answers and where to write the results (the model is model_name_or_path)."""

    output_dir: str | None = field(default=None, metadata={"help": "directory for results.jsonl and summary.json"})
    n_samples: int = field(default=1, metadata={"help": "answers sampled per question"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_completion_length: int = field(default=16384, metadata={
        "help": "longest answer in tokens (clamped to the model's context)"})
    seed: int = field(default=0, metadata={"help": "engine seed"})

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("output_dir=... is required")
        for key in ("n_samples", "max_completion_length"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        from rlt.generation.offline import check_sampling

        check_sampling(self.temperature, self.top_p, "n_samples", self.n_samples)


def eval_rows(data: DataConfig, fmt_cfg: FormatConfig) -> tuple[list[dict], object]:
    """([{question, answer, system, numbers, target}], format) from a dataset of any supported format. Errors
    name the row's file line for JSON-lines files; ``drop_bad_rows`` skips bad rows (counted in the log)."""
    from rlt.answers import last_boxed
    from rlt.data.examples import SKIP_HINT, RowError, row_parser, row_place
    from rlt.data.formats import resolve_format
    from rlt.data.loading import load_data_table

    source = data.require_dataset()
    ds, lines = load_data_table(data)
    cols = set(ds.column_names)
    plain_qa = "answer" in cols and not cols & {"conversations", "solution"}  # a benchmark: question + answer
    fmt = resolve_format(fmt_cfg.data_format, None if plain_qa else ds.column_names, source=source,
                         student_system_prompt=fmt_cfg.student_system_prompt)
    parse = qa_parser(ds.column_names, source) if plain_qa else row_parser(fmt, ds.column_names, source)
    # custom rows with an answer column need no solution (it is only where a row without an answer takes one from)
    with_answer = qa_parser(ds.column_names, source) if "answer" in cols and not plain_qa and \
        "conversations" not in cols else parse
    rows, bad = [], []
    for i, raw in enumerate(ds):
        try:
            answer = raw.get("answer")
            ex = with_answer(raw) if answer is not None and str(answer).strip() else parse(raw)
            if answer is None or not str(answer).strip():
                answer = last_boxed(ex.solution)
            if answer is None or not str(answer).strip():
                raise RowError("no gold answer (an 'answer' column, or a \\boxed{} in the solution)")
        except RowError as e:
            where = row_place(i, lines)
            if not data.drop_bad_rows:
                raise RowError(f"{source}, {where}: {e} {SKIP_HINT}") from None
            bad.append(where)
            continue
        rows.append({"question": ex.question, "answer": str(answer).strip(), "system": ex.system,
                     "numbers": raw.get("numbers"), "target": raw.get("target")})
    if bad:
        logger.warning("%s: dropped %d row(s) without a question or gold answer (first: %s)", source, len(bad),
                       ", ".join(bad[:10]))
    if not rows:
        raise RowError(f"{source}: no row to evaluate")
    if fmt_cfg.student_system_prompt is None and any(r["system"] is None for r in rows):
        logger.warning("%s: %d row(s) have no system prompt; the model sees the format's default student prompt "
                       "(%r); if it was trained with another (e.g. Stratos rows' own), give it as "
                       "student_system_prompt=...", source, sum(r["system"] is None for r in rows),
                       fmt.student_system_prompt[:60] + "...")
    return rows, fmt


def qa_parser(columns, source: str):
    """Parser of question/answer rows (no solution): an Example with the question and system only."""
    from rlt.data.examples import Example, RowError, question_column

    qcol = question_column(columns)
    logger.info("%s: question/answer rows, questions read from column %r", source, qcol)

    def parse(row: dict) -> Example:
        question, system = row.get(qcol), row.get("system")
        if not isinstance(question, str) or not question.strip():
            raise RowError(f"empty, missing or non-text {qcol!r}")
        return Example(question=question, solution="", thought="",
                       system=system if isinstance(system, str) and system else None)

    return parse


def evaluate(rows: list[dict], generate, tokenizer, fmt, n_samples: int) -> tuple[list[dict], dict]:
    """Score n_samples generations per row. ``generate(prompt_texts, n) -> [[text] * n]``."""
    from rlt.answers import check_answer, extract_answer
    from rlt.data.text import render_student_prompt

    prompts = [render_student_prompt(tokenizer, r["question"], r["system"], fmt) for r in rows]
    outputs = generate(prompts, n_samples)
    results = []
    for r, outs in zip(rows, outputs):
        preds = [extract_answer(o, fmt) for o in outs]
        correct = [check_answer(p, r["answer"], r["numbers"], r["target"]) for p in preds]
        results.append({"question": r["question"], "answer": r["answer"], "predictions": preds, "correct": correct,
                        "accuracy": sum(correct) / len(correct), "outputs": outs})
    n = len(results)
    summary = {"questions": n, "samples_per_question": n_samples,
               "accuracy": sum(x["accuracy"] for x in results) / n if n else 0.0,
               "any_correct": sum(any(x["correct"]) for x in results) / n if n else 0.0,
               "no_answer": sum(p is None for x in results for p in x["predictions"]) / max(1, n * n_samples)}
    return results, summary


def main(argv: list[str] | None = None) -> None:
    from rlt.procs import run_supervised

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    with user_errors("rlt.eval"):
        objs = compose_tool("rlt.eval", EvalConfig, (ModelConfig, DataConfig, FormatConfig, RolloutConfig), argv,
                            __doc__)
        if not objs[RolloutConfig].vllm_host:  # vLLM's offline engine in-process: run it under a guard
            rc = run_supervised("rlt.eval", argv)
            if rc is not None:
                raise SystemExit(rc)
        from rlt.generation.server import ServerStartError

        try:
            run_eval(objs[EvalConfig], objs[ModelConfig], objs[DataConfig], objs[FormatConfig], objs[RolloutConfig])
        except ServerStartError as e:   # a local server did not start: its log's tail, not a traceback
            logger.error("%s", e)
            raise SystemExit(1) from None


def check_output_dir(out: Path) -> None:
    """``out`` is a writable directory and the files written there are not directories."""
    check_writable(out, "output_dir")
    refuse_directories([out / "results.jsonl", out / "summary.json"], f"output_dir={out}")


def fitting_rows(rows: list[dict], tokenizer, fmt, max_prompt_length: int) -> tuple[list[dict], dict[str, list[int]]]:
    """(the rows whose student prompt has at most ``max_prompt_length`` tokens, {prompt text: token ids});
    longer ones are dropped and counted in the log, as rlt.train does."""
    from rlt.data.loading import prompt_ids_within
    from rlt.data.text import render_student_prompt

    prompts = [render_student_prompt(tokenizer, r["question"], r["system"], fmt) for r in rows]
    kept = prompt_ids_within(tokenizer, prompts, max_prompt_length)
    return [rows[i] for i in kept], {prompts[i]: ids for i, ids in kept.items()}


def run_eval(cfg: EvalConfig, model_cfg: ModelConfig, data: DataConfig, fmt_cfg: FormatConfig,
             rollout: RolloutConfig) -> dict:
    from rlt.generation.offline import close_engine, make_engine
    from rlt.models import load_tokenizer, resolve_model_path

    out = Path(cfg.output_dir)
    check_output_dir(out)
    if rollout.vllm_local_servers:
        from rlt.generation.offline import check_local_servers

        check_local_servers(rollout.vllm_local_servers, rollout.vllm_port)
    model = resolve_model_path(model_cfg.require_model(), "model")
    rows, fmt = eval_rows(data, fmt_cfg)
    tok = load_tokenizer(model)
    rows, ids = fitting_rows(rows, tok, fmt, data.max_prompt_length)
    engine = make_engine(model, rollout, data.max_prompt_length + cfg.max_completion_length, cfg.seed, model_cfg.dtype,
                         longest_prompt=max(map(len, ids.values())), log_dir=out / "vllm_logs")

    def generate(prompts, n):
        outs = engine.generate([ids[p] for p in prompts], n, cfg.max_completion_length, cfg.temperature, cfg.top_p,
                               seed=cfg.seed)
        return [[tok.decode(c, skip_special_tokens=True) for c in per] for per in outs]

    try:
        results, summary = evaluate(rows, generate, tok, fmt, cfg.n_samples)
    finally:
        close_engine(engine)
    with open(out / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    summary.update(model=model_cfg.model_name_or_path, dataset=data.dataset_id_or_path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("accuracy %.3f over %d questions x %d samples (no answer %.3f) -> %s", summary["accuracy"],
                summary["questions"], cfg.n_samples, summary["no_answer"], out)
    return summary


if __name__ == "__main__":
    main()

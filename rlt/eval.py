"""Accuracy of a (student) model on a question/answer dataset.

    python -m rlt.eval model=PATH dataset=ID_OR_FILE output_dir=DIR [n_samples=1] [temperature=0.0]
        [max_tokens=16384] [split=train] [max_samples=N] [data_format=bespoke_stratos]
        [vllm_host=HOST vllm_port=8765]   (default: vLLM's offline engine)

Rows need `question` (or `prompt`) and `answer`; Countdown rows also carry
`numbers` and `target` and are checked by evaluating the expression; Stratos
rows (system + conversations) take the gold answer from their solution. The
model sees the student system prompt (the row's `system`, else the format's).
Writes DIR/results.jsonl (one row per question) and DIR/summary.json.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rlt.cli import parse_kv
from rlt.logging_utils import setup_logging

logger = logging.getLogger("rlt.eval")
DEFAULTS = {"model": None, "dataset": None, "output_dir": None, "n_samples": 1, "temperature": 0.0, "top_p": 1.0,
            "max_tokens": 16384, "max_prompt_length": 4096, "split": "train", "max_samples": None,
            "data_format": "bespoke_stratos", "student_system_prompt": None, "vllm_host": None, "vllm_port": 8765,
            "vllm_num_servers": 1, "dtype": "auto", "seed": 0}


def eval_rows(dataset: str, split: str, max_samples: int | None, fmt) -> list[dict]:
    """[{question, answer, system, numbers?, target?}] from a dataset."""
    from rlt.answers import extract_answer
    from rlt.data.examples import QUESTION_COLUMNS, RowError, parse_stratos_row
    from rlt.data.loading import load_rows

    ds = load_rows(dataset, split)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    rows = []
    for i, r in enumerate(ds):
        q = next((r[c] for c in QUESTION_COLUMNS if r.get(c)), None)
        answer, system = r.get("answer"), r.get("system")
        if "conversations" in r and r["conversations"]:
            ex = parse_stratos_row(r, fmt)
            q = ex.question
            answer = answer or extract_answer(fmt.solution_tags[0] + ex.solution + fmt.solution_tags[1], fmt)
        if not q or answer is None:
            raise RowError(f"{dataset}, row {i}: needs a question and an answer")
        rows.append({"question": q, "answer": str(answer), "system": system, "numbers": r.get("numbers"),
                     "target": r.get("target")})
    return rows


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
    setup_logging()
    args = parse_kv(sys.argv[1:] if argv is None else argv, DEFAULTS, ("model", "dataset", "output_dir"), "rlt.eval")
    from rlt.data.formats import resolve_format
    from rlt.generation.offline import make_engine
    from rlt.models import load_tokenizer, resolve_model_path

    model = resolve_model_path(args["model"])
    fmt = resolve_format(args["data_format"], args["dataset"], student_system_prompt=args["student_system_prompt"])
    tok = load_tokenizer(model)
    rows = eval_rows(args["dataset"], args["split"], args["max_samples"], fmt)
    engine = make_engine(model, args["vllm_host"], args["vllm_port"], args["vllm_num_servers"],
                         args["max_prompt_length"] + args["max_tokens"], args["seed"], args["dtype"])

    def generate(prompts, n):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = engine.generate(ids, n, args["max_tokens"], args["temperature"], args["top_p"], seed=args["seed"])
        return [[tok.decode(c, skip_special_tokens=True) for c in per] for per in outs]

    results, summary = evaluate(rows, generate, tok, fmt, args["n_samples"])
    out = Path(args["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    summary.update(model=args["model"], dataset=args["dataset"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("accuracy %.3f over %d questions x %d samples -> %s", summary["accuracy"], summary["questions"],
                args["n_samples"], out)


if __name__ == "__main__":
    main()

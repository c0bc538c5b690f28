"""Distillation data from a trained teacher: its raw explanations become student reasoning traces.

    python -m rlt.distill teacher=PATH dataset=ID_OR_FILE output=OUT.jsonl \
        [num_explanations=4] [select=all|best_of_k] [student=PATH (best_of_k)] \
        [missing_end_tag=drop|penalise] [temperature=0.7] [max_tokens=16384] \
        [vllm_host=HOST vllm_port=8765 vllm_num_servers=1]  (default: vLLM's offline engine)
        [data_format=auto] [split=train] [max_samples=N] [reward keys, e.g. kl_penalty_reward_coeff=[3,0.03]]

Per question, k explanations are generated from the RL prompt; the thought is
taken exactly as the reward takes it and the student trace is
<think>thought</think> + delimiter + <sol>solution</sol>, so every row's
student text is byte-identical to what the reward scored. Output rows are
Stratos-format (system + conversations) plus `source_index` and, with
best_of_k, `reward`. The output is appended question by question: a rerun
skips questions already written. An output ending in .parquet is written
from the jsonl progress file at the end.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rlt.cli import parse_kv
from rlt.rewards.config import REWARD_CFG_YAML
from rlt.logging_utils import setup_logging

logger = logging.getLogger("rlt.distill")
DEFAULTS = {"teacher": None, "dataset": None, "output": None, "student": None, "num_explanations": 4,
            "select": "all", "missing_end_tag": "drop", "temperature": 0.7, "top_p": 1.0, "max_tokens": 16384,
            "max_prompt_length": 16384, "vllm_host": None, "vllm_port": 8765, "vllm_num_servers": 1,
            "data_format": "auto", "split": "train", "max_samples": None, "drop_bad_rows": False,
            "student_system_prompt": None, "teacher_system_prompt": None, "dtype": "auto", "seed": 0,
            "chunk_size": 16, "scoring_dtype": "float32"}


def done_indices(progress: Path) -> set[int]:
    if not progress.exists():
        return set()
    done = set()
    with open(progress) as f:
        for line in f:
            if line.strip():
                done.add(json.loads(line)["source_index"])
    return done


def select_rows(examples, completions, fmt, args, scorer=None, teacher_prompts=None) -> tuple[list[dict], dict]:
    """Rows to write for a chunk of questions, and counts (no_end_tag, dropped_questions)."""
    from rlt.data.text import stratos_row, student_system
    from rlt.rewards.teacher_reward import RewardInput, extract_thought

    rows, counts = [], {"explanations": 0, "no_end_tag": 0, "questions_without_rows": 0}
    for (idx, ex), texts in zip(examples, completions):
        system = student_system(ex.system, fmt)
        kept = []
        for text in texts:
            counts["explanations"] += 1
            thought, _, matched = extract_thought(text, fmt)
            if not matched:
                counts["no_end_tag"] += 1
                if args["missing_end_tag"] == "drop":
                    continue
            kept.append((text, thought))
        if not kept:
            counts["questions_without_rows"] += 1
            continue
        if args["select"] == "best_of_k":
            items = [RewardInput(teacher_prompts[idx], text, ex.question, ex.solution, system) for text, _ in kept]
            rewards = scorer(items).rewards.tolist()
            best = max(range(len(kept)), key=lambda i: rewards[i])
            rows.append(stratos_row(ex.question, kept[best][1], ex.solution, system, fmt, source_index=idx,
                                    reward=rewards[best]))
        else:
            rows.extend(stratos_row(ex.question, thought, ex.solution, system, fmt, source_index=idx)
                        for _, thought in kept)
    return rows, counts


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    distill(parse_kv(sys.argv[1:] if argv is None else argv, DEFAULTS, ("teacher", "dataset", "output"),
                     "rlt.distill", REWARD_CFG_YAML))


def distill(args: dict, engine=None) -> dict:
    """Run distillation; ``engine`` (with .generate(prompt_ids, n, max_tokens, temperature, top_p, seed))
    defaults to vLLM (offline, or the servers at vllm_host). Returns the counts of this run."""
    if args["select"] not in ("all", "best_of_k"):
        raise SystemExit(f"rlt.distill: select={args['select']!r}: use all or best_of_k")
    if args["missing_end_tag"] not in ("drop", "penalise"):
        raise SystemExit(f"rlt.distill: missing_end_tag={args['missing_end_tag']!r}: use drop or penalise")
    if args["select"] == "best_of_k" and not args["student"]:
        raise SystemExit("rlt.distill: select=best_of_k scores explanations with the teacher reward: give student=PATH")
    from tqdm import tqdm

    from rlt.data.formats import resolve_format
    from rlt.data.loading import load_examples
    from rlt.data.text import teacher_prompt
    from rlt.generation.offline import make_engine
    from rlt.models import load_tokenizer, resolve_model_path

    teacher = resolve_model_path(args["teacher"])
    fmt = resolve_format(args["data_format"], args["dataset"], student_system_prompt=args["student_system_prompt"],
                         teacher_system_prompt=args["teacher_system_prompt"])
    tok = load_tokenizer(teacher)
    examples = load_examples(args["dataset"], fmt, args["split"], drop_bad_rows=args["drop_bad_rows"],
                             max_samples=args["max_samples"])
    out = Path(args["output"])
    progress = out if out.suffix == ".jsonl" else out.with_suffix(out.suffix + ".progress.jsonl")
    progress.parent.mkdir(parents=True, exist_ok=True)
    done = done_indices(progress)
    todo = [(i, ex) for i, ex in enumerate(examples) if i not in done]
    logger.info("%d questions, %d already written, %d to do", len(examples), len(done), len(todo))
    prompts = {i: teacher_prompt(tok, ex.question, ex.solution, fmt) for i, ex in todo}
    scorer = None
    if args["select"] == "best_of_k" and todo:
        from rlt.rewards.config import RewardConfig
        from rlt.rewards.teacher_reward import load_scorer

        try:
            scorer = load_scorer(teacher, args["student"], tok, fmt, RewardConfig.from_dict(args), args["temperature"],
                                 args["scoring_dtype"])
        except ValueError as e:
            raise SystemExit(f"rlt.distill: {e}") from None
    totals = {"explanations": 0, "no_end_tag": 0, "questions_without_rows": 0, "rows": 0}
    if todo and engine is None:
        engine = make_engine(teacher, args["vllm_host"], args["vllm_port"], args["vllm_num_servers"],
                             args["max_prompt_length"] + args["max_tokens"], args["seed"], args["dtype"])
    if todo:
        step = args["chunk_size"]
        for s in tqdm(range(0, len(todo), step), desc="distilling", unit="chunk"):
            chunk = todo[s:s + step]
            ids = [tok(prompts[i], add_special_tokens=False)["input_ids"] for i, _ in chunk]
            gen = engine.generate(ids, args["num_explanations"], args["max_tokens"], args["temperature"],
                                  args["top_p"], seed=args["seed"] + s)
            texts = [[tok.decode(c, skip_special_tokens=True) for c in per_q] for per_q in gen]
            rows, counts = select_rows(chunk, texts, fmt, args, scorer, prompts)
            with open(progress, "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            for k, v in counts.items():
                totals[k] += v
            totals["rows"] += len(rows)
    logger.info("explanations %d, without end tag %d (%s), questions with no row %d, rows written %d",
                totals["explanations"], totals["no_end_tag"], args["missing_end_tag"],
                totals["questions_without_rows"], totals["rows"])
    if out != progress:
        import datasets

        datasets.Dataset.from_json(str(progress)).to_parquet(str(out))
    summary = out.with_suffix(".summary.json")
    summary.write_text(json.dumps({**totals, "select": args["select"], "num_explanations": args["num_explanations"]},
                                  indent=2))
    logger.info("distilled dataset: %s", out)
    return totals


if __name__ == "__main__":
    main()

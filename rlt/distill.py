"""Distillation data from a trained teacher: its raw explanations become student reasoning traces.

    python -m rlt.distill teacher=PATH dataset=ID_OR_FILE output=OUT.jsonl \
        [num_explanations=4] [select=all|best_of_k] [student=PATH (best_of_k)] \
        [missing_end_tag=drop|penalise] [temperature=0.7] [max_completion_length=16384] \
        [vllm_local_servers=N (N servers started here, one per GPU) | vllm_host=HOST vllm_port=8765
         vllm_num_servers=1 (running servers)]  (default: vLLM's offline engine, one GPU)
        [data_format=auto] [dataset_split=train] [max_samples=N] [reward keys, e.g. kl_penalty_reward_coeff=[3,0.03]]
    python -m rlt.distill --help      # every key with its default

Per question, k explanations are generated from the RL prompt; the thought is
taken exactly as the reward takes it and the student trace is
<think>thought</think> + delimiter + <sol>solution</sol>, so every row's
student text is byte-identical to what the reward scored. Output rows are
Stratos-format (system + conversations) plus `source_index`, `question_rows`
(the rows written for that question) and, with best_of_k, `reward`.

Crash safety: each question's rows are appended in one write and flushed; on a
rerun a torn last line is cut off (logged), a question with fewer rows than its
`question_rows` is removed and redone, and finished questions are skipped; a
row whose question is not the dataset's question at its `source_index` stops the
run (the file is someone else's) before anything is changed, as does a file
written with another teacher (path or weights) or other sampling, selection,
data or reward settings (OUT.jsonl.settings.json); max_samples, batching and
devices may change between calls. An output ending
in .parquet is written from the jsonl progress file at the end. Prompts longer
than max_prompt_length tokens are dropped (counted in the log), as in training.
OUT.summary.json describes the whole file: its rows and questions, the dataset's
questions without a row, the explanations generated for it (over the calls that
finished) and `last_call`, the counts of the call that wrote the summary.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import field
from pathlib import Path

from rlt.cli import (append_jsonl_synced, check_same_settings, check_writable_file, refuse_directories, user_errors,
                     without_torn_line, write_json_atomic)
from rlt.config import compose_tool
from rlt.data.config import DataConfig, FormatConfig
from rlt.errors import ConfigError
from rlt.generation.config import RolloutConfig
from rlt.logging_utils import setup_logging
from rlt.models import ModelConfig
from rlt.rewards.config import RewardConfig

logger = logging.getLogger("rlt.distill")


@dataclasses.dataclass
class DistillConfig:
    """How many explanations per question, which to keep, where to write (the teacher is model_name_or_path)."""

    output: str | None = field(default=None, metadata={"help": "output .jsonl (or .parquet) of Stratos rows"})
    num_explanations: int = field(default=4, metadata={"help": "explanations generated per question (k)"})
    select: str = field(default="all", metadata={
        "help": "all: keep every explanation | best_of_k: keep the one the teacher reward scores highest"})
    missing_end_tag: str = field(default="drop", metadata={
        "help": "explanations without the end tag: drop | penalise (kept, scored with not_matched_penalty)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_completion_length: int = field(default=16384, metadata={
        "help": "longest explanation in tokens (clamped to the model's context)"})
    seed: int = field(default=0, metadata={"help": "engine seed"})
    chunk_size: int = field(default=16, metadata={"help": "questions per generation call (and per progress write); raise it with several servers"})
    scorer_device: str = field(default="auto", metadata={
        "help": "where best_of_k scores: auto (GPU 0 with vllm_host servers; the first GPU vllm_local_servers "
                "leave free; the last GPU when vLLM's offline engine holds GPU 0 and there are several; else cpu) | "
                "cpu | cuda | cuda:N"})

    def __post_init__(self):
        if not self.output:
            raise ConfigError("output=... is required (a .jsonl or .parquet path)")
        if self.select not in ("all", "best_of_k"):
            raise ConfigError(f"select={self.select!r}: choose all or best_of_k")
        if self.missing_end_tag not in ("drop", "penalise"):
            raise ConfigError(f"missing_end_tag={self.missing_end_tag!r}: choose drop or penalise")
        for key in ("num_explanations", "max_completion_length", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        from rlt.generation.offline import check_sampling

        check_sampling(self.temperature, self.top_p, "num_explanations", self.num_explanations)


def scorer_device(setting: str, servers: bool, gpus: int | None = None, local_servers: int = 0) -> str:
    """The device best_of_k scores on (``scorer_device``); ``servers``: generation runs on vLLM servers
    elsewhere; ``local_servers``: on that many servers started here (GPUs 0..local_servers-1).

    ``auto``: no GPU -> cpu; servers -> cuda:0; local servers -> the first GPU they leave free, else cpu; vLLM's
    offline engine in this process (it takes 90% of GPU 0) -> the last GPU when there are several, else cpu
    (said in the log). Other settings: checked as given.
    """
    from rlt.models import gpu_count, resolve_device

    if setting != "auto":
        return resolve_device(setting, "scorer_device")
    gpus = gpu_count() if gpus is None else gpus
    if gpus == 0:
        return "cpu"
    if local_servers:
        if gpus > local_servers:
            return f"cuda:{local_servers}"
        logger.info("scorer_device=auto: best_of_k scores on the CPU, the %d local server(s) hold every GPU (start "
                    "one server fewer to score on a GPU)", local_servers)
        return "cpu"
    if servers:
        return "cuda:0"
    if gpus >= 2:
        return f"cuda:{gpus - 1}"
    logger.info("scorer_device=auto: best_of_k scores on the CPU, the only GPU holds vLLM's offline engine (run "
                "servers with vllm_host, or use a machine with two GPUs, to score on a GPU)")
    return "cpu"


# ----------------------------------------------------------------------------------------- progress file
def settings_path(progress: Path) -> Path:
    return progress.with_name(progress.name + ".settings.json")


def run_settings(teacher: str, student: str | None, cfg: DistillConfig, data: DataConfig, fmt_cfg: FormatConfig,
                 reward: RewardConfig) -> dict:
    """What the rows of a progress file depend on: the teacher (a local one by its weights, wherever it lies; a
    hub one by its id), the data and format, how explanations are sampled and kept, and, with best_of_k, the
    student and reward. Run length (max_samples), batching, device, dtype and the reward's memory settings may
    change between calls; a local dataset path is compared resolved."""
    from rlt.models import weights_fingerprint
    from rlt.runs import RESUME_MAY_CHANGE

    sampling = {k: getattr(cfg, k) for k in ("num_explanations", "select", "missing_end_tag", "temperature", "top_p",
                                             "max_completion_length", "seed")}
    data_keys = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("max_samples", "drop_bad_rows")}
    spec = data.dataset_id_or_path
    if spec and Path(spec).expanduser().exists():
        data_keys["dataset_id_or_path"] = str(Path(spec).expanduser().resolve())
    def model(key: str, path: str | None) -> dict:   # a local model by its weights (a copy elsewhere is the same)
        fingerprint = weights_fingerprint(path) if path else None
        return {f"{key}_weights": fingerprint} if fingerprint else {key: path}

    out = {**model("teacher", teacher), "data": data_keys, "format": dataclasses.asdict(fmt_cfg), **sampling}
    if cfg.select == "best_of_k":
        scoring = {k: v for k, v in dataclasses.asdict(reward).items() if k not in RESUME_MAY_CHANGE}
        out.update(**model("student", student), reward=scoring)
    return out


def check_settings(progress: Path, settings: dict) -> None:
    """A progress file holding rows must have been written with ``settings`` (its .settings.json): else one line
    naming the keys that differ (e.g. a teacher trained again at the same path), before anything is changed. A
    file from before settings were recorded is resumed unchecked, with a warning."""
    if not progress.is_file() or not progress.stat().st_size:
        return
    meta = settings_path(progress)
    check_same_settings(meta, settings, f"{progress}: its rows were written",
                        f"move it away (and {meta.name}) to distill from the start, or give the settings it was "
                        "written with",
                        missing=f"{progress}: no {meta.name} beside it (written before settings were recorded): "
                                "resumed without checking that its rows come from this teacher and these settings")


def has_end_tag_column(progress: Path) -> bool:
    """Whether the rows already in ``progress`` record ``end_tag`` (those of rlt before it did not)."""
    with open(progress, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    return "end_tag" in json.loads(first) if first else True


def load_progress(progress: Path, questions: list[str] | None = None) -> set[int]:
    """Finished question indices of a progress file, after repairing it.

    A torn last line (no newline: the writer died mid-write) is cut off; questions with fewer rows than
    their ``question_rows`` are removed (they are redone). Both are logged. Any other unreadable line is
    an error naming the file and line. ``questions`` (the dataset's, by index): a row whose question is not
    the one at its ``source_index`` is an error naming the file and line, raised before anything is changed.
    """
    if not progress.exists():
        return set()
    data = progress.read_bytes()
    whole = len(data)
    data = without_torn_line(progress, data)
    rows = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            rows.append((int(row["source_index"]), int(row["question_rows"]), raw))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{progress}, line {lineno}: not a row written by rlt.distill ({e}); move the file "
                              "away or fix that line") from None
        if questions is not None:
            check_row_question(progress, lineno, row, questions)
    have = Counter(i for i, _, _ in rows)
    partial = {i for i, n, _ in rows if have[i] != n}
    if partial:
        logger.warning("%s: %d question(s) were written only in part (%s); they are redone", progress, len(partial),
                       sorted(partial)[:10])
    keep = b"".join(raw + b"\n" for i, _, raw in rows if i not in partial)
    if len(keep) != whole:
        tmp = progress.with_name(progress.name + ".repair")
        tmp.write_bytes(keep)
        os.replace(tmp, progress)
    return {i for i, _, _ in rows if i not in partial}


def row_question(row: dict) -> str | None:
    """The question (first user turn) of a Stratos row, or None."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        return None
    return next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "user"), None)


def check_row_question(progress: Path, lineno: int, row: dict, questions: list[str]) -> None:
    """A row at ``source_index`` i holds the dataset's question i (an index past the dataset's end is left
    alone: a rerun with a smaller max_samples); else the file holds rows of other data."""
    i = int(row["source_index"])
    if i < len(questions) and row_question(row) != questions[i]:
        raise ConfigError(f"{progress}, line {lineno}: its question is not question {i} (source_index) of the "
                          "dataset, so this file was written from other data; give another output or move the file "
                          "away (nothing was changed)")


# ----------------------------------------------------------------------------------------- selection
def select_rows(examples, completions, fmt, cfg: DistillConfig, scorer=None, teacher_prompts=None):
    """Rows per question for a chunk of questions, and counts.

    Returns ([(question index, [rows])], counts with explanations / no_end_tag / tags_in_thought /
    questions_without_rows). An explanation holding one of the student's think or solution tags is dropped and
    counted (``tags_in_thought``): written into a row, the student's text would split at it, so the row would no
    longer read back as the thought and solution that were scored.
    """
    from rlt.data.text import stratos_row, student_system
    from rlt.rewards.teacher_reward import RewardInput, extract_thought

    student_tags = (*fmt.think_tags, *fmt.solution_tags)
    per_question, counts = [], {"explanations": 0, "no_end_tag": 0, "tags_in_thought": 0, "questions_without_rows": 0}
    for (idx, ex), texts in zip(examples, completions):
        system = student_system(ex.system, fmt)
        kept = []
        for text in texts:
            counts["explanations"] += 1
            thought, _, matched = extract_thought(text, fmt)
            if not matched:
                counts["no_end_tag"] += 1
                if cfg.missing_end_tag == "drop":
                    continue
            if any(tag in thought for tag in student_tags):
                counts["tags_in_thought"] += 1
                continue
            kept.append((text, thought, matched))
        if not kept:
            counts["questions_without_rows"] += 1
            continue
        if cfg.select == "best_of_k":
            items = [RewardInput(teacher_prompts[idx], text, ex.question, ex.solution, system) for text, _, _ in kept]
            rewards = scorer(items).rewards.tolist()
            best = max(range(len(kept)), key=lambda i: rewards[i])
            rows = [stratos_row(ex.question, kept[best][1], ex.solution, system, fmt, source_index=idx,
                                question_rows=1, reward=rewards[best], end_tag=kept[best][2])]
        else:
            rows = [stratos_row(ex.question, thought, ex.solution, system, fmt, source_index=idx,
                                question_rows=len(kept), end_tag=matched) for _, thought, matched in kept]
        per_question.append((idx, rows))
    return per_question, counts


def distill_chunks(engine, tok, todo, prompts, prompt_ids, fmt, cfg: DistillConfig, scorer, f, totals: dict,
                   bar=None, end_tag_column: bool = True, overlap: bool = False) -> None:
    """Generate ``cfg.num_explanations`` per question of ``todo`` (``cfg.chunk_size`` questions per call) from
    ``prompt_ids`` ({index: token ids} of ``prompts``), select the rows, append each question's rows to ``f`` and
    add the counts to ``totals``; ``bar`` (a tqdm) advances once per chunk written.
    ``end_tag_column=False``: rows without ``end_tag`` (resuming a file written before rlt recorded it: the
    ``datasets`` JSON reader refuses columns that change within a file).
    ``overlap``: the next chunk is generated (in a thread) while this one is scored and written, for an engine
    that generates outside this process (vLLM servers or vLLM's engine core) beside a scorer of its own; the
    same calls go to the engine in the same order as in the plain loop, and the rows are written in that order."""
    def generate(s: int):
        chunk = todo[s:s + cfg.chunk_size]
        return chunk, engine.generate([prompt_ids[i] for i, _ in chunk], cfg.num_explanations,
                                      cfg.max_completion_length, cfg.temperature, cfg.top_p, seed=cfg.seed + s)

    def write(chunk, gen) -> None:
        texts = [[tok.decode(c, skip_special_tokens=True) for c in per_q] for per_q in gen]
        per_question, counts = select_rows(chunk, texts, fmt, cfg, scorer, prompts)
        for _, rows in per_question:
            if not end_tag_column:
                rows = [{k: v for k, v in r.items() if k != "end_tag"} for r in rows]
            append_jsonl_synced(f, rows)
            totals["rows"] += len(rows)
        for k, v in counts.items():
            totals[k] += v
        if bar is not None:
            bar.update(1)

    starts = range(0, len(todo), cfg.chunk_size)
    if not overlap or not starts:
        for s in starts:
            write(*generate(s))
        return
    ahead = Ahead(generate, starts[0])
    for s in [*starts[1:], None]:
        chunk, gen = ahead.result()
        ahead = Ahead(generate, s) if s is not None else None
        write(chunk, gen)


class Ahead:
    """``fn(*args)`` started in a daemon thread: a failing run exits without waiting for it (:meth:`result`
    waits, and raises what ``fn`` raised)."""

    def __init__(self, fn, *args):
        import threading

        self._out, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name="rlt-distill-generate")
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._out = fn(*args)
        except BaseException as e:  # handed to result(), in the caller's thread
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def main(argv: list[str] | None = None) -> None:
    from rlt.procs import run_supervised

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    with user_errors("rlt.distill"):
        objs = compose_tool("rlt.distill", DistillConfig,
                            (ModelConfig, DataConfig, FormatConfig, RewardConfig, RolloutConfig), argv, __doc__)
        if not objs[RolloutConfig].vllm_host:  # vLLM's offline engine in-process: run it under a guard
            rc = run_supervised("rlt.distill", argv)
            if rc is not None:
                raise SystemExit(rc)
        from rlt.generation.server import ServerStartError

        try:
            distill(objs[DistillConfig], objs[ModelConfig], objs[DataConfig], objs[FormatConfig], objs[RewardConfig],
                    objs[RolloutConfig])
        except ServerStartError as e:   # a local server did not start: its log's tail, not a traceback
            logger.error("%s", e)
            raise SystemExit(1) from None


def distill(cfg: DistillConfig, model: ModelConfig, data: DataConfig, fmt_cfg: FormatConfig, reward: RewardConfig,
            rollout: RolloutConfig, engine=None) -> dict:
    """Run distillation; ``engine`` (with .generate(prompt_ids, n, max_tokens, temperature, top_p, seed))
    defaults to vLLM (offline, or the servers at vllm_host). Returns the counts of this run."""
    device = None
    if rollout.vllm_local_servers:
        from rlt.generation.offline import check_local_servers

        check_local_servers(rollout.vllm_local_servers, rollout.vllm_port)   # before any model loads
    if cfg.select == "best_of_k":
        from rlt.rewards.logprobs import check_reward_device

        if not reward.student_model:
            raise ConfigError("select=best_of_k scores explanations with the teacher reward: give student=PATH")
        device = scorer_device(cfg.scorer_device, bool(rollout.vllm_host), local_servers=rollout.vllm_local_servers)
        check_reward_device(reward, device)
    from tqdm import tqdm

    from rlt.data.loading import load_dataset_examples
    from rlt.generation.offline import close_engine, make_engine
    from rlt.models import load_tokenizer, resolve_model_path

    out, progress, summary = output_paths(cfg.output)
    teacher = resolve_model_path(model.require_model(), "teacher")
    student = resolve_model_path(reward.student_model, "student") if cfg.select == "best_of_k" else None
    examples, fmt = load_dataset_examples(data, fmt_cfg)
    tok = load_tokenizer(teacher)
    settings = run_settings(teacher, student, cfg, data, fmt_cfg, reward)
    check_settings(progress, settings)
    done = load_progress(progress, [ex.question for ex in examples])
    todo = [(i, ex) for i, ex in enumerate(examples) if i not in done]
    logger.info("%d questions, %d already written, %d to do", len(examples), len(done), len(todo))
    todo, prompts, prompt_ids = fitting_todo(todo, tok, fmt, data.max_prompt_length)
    scorer = None
    if cfg.select == "best_of_k" and todo:
        from rlt.rewards.teacher_reward import load_scorer

        scorer = load_scorer(teacher, student, tok, fmt, reward, cfg.temperature, model.dtype, device)
    totals = new_totals()
    made = None
    if todo and engine is None:
        engine = made = make_engine(teacher, rollout, data.max_prompt_length + cfg.max_completion_length, cfg.seed,
                                    model.dtype, longest_prompt=max(map(len, prompt_ids.values())),
                                    log_dir=progress.parent / "vllm_logs")
    try:
        if todo:
            write_json_atomic(settings_path(progress), settings)
        with open(progress, "a") as f, tqdm(total=len(range(0, len(todo), cfg.chunk_size)), desc="distilling", unit="chunk",
                                            disable=not todo) as bar:
            # best_of_k: the scorer works on one chunk while vLLM generates the next
            distill_chunks(engine, tok, todo, prompts, prompt_ids, fmt, cfg, scorer, f, totals, bar,
                           end_tag_column=not done or has_end_tag_column(progress), overlap=scorer is not None)
    finally:
        close_engine(made)
    logger.info("explanations %d, without end tag %d (%s), with the student's tags in the thought %d (dropped), "
                "questions with no row %d, rows written %d", totals["explanations"], totals["no_end_tag"],
                cfg.missing_end_tag, totals["tags_in_thought"], totals["questions_without_rows"], totals["rows"])
    if todo and totals["rows"] == 0:
        hint = ("every explanation lacked the end tag: raise max_completion_length or set missing_end_tag=penalise"
                if totals["no_end_tag"] == totals["explanations"] else "no explanation was kept")
        raise ConfigError(f"0 rows written to {progress}: {hint}")
    if out != progress:
        import datasets

        datasets.Dataset.from_json(str(progress)).to_parquet(str(out))
    write_summary(summary, progress, totals, cfg, len(examples), resumed=bool(done))
    logger.info("distilled dataset: %s", out)
    return totals


def output_paths(output: str) -> tuple[Path, Path, Path]:
    """(output, jsonl progress file, summary) of ``output=...``, each checked to be a writable file path."""
    out = Path(output)
    if out.suffix not in (".jsonl", ".parquet"):
        raise ConfigError(f"output={output}: use a .jsonl or .parquet path")
    progress = out if out.suffix == ".jsonl" else out.with_suffix(out.suffix + ".progress.jsonl")
    summary = out.with_suffix(".summary.json")
    check_writable_file(out)
    refuse_directories(sorted({progress, summary} - {out}), f"output={output}")
    return out, progress, summary


def fitting_todo(todo: list, tokenizer, fmt, max_prompt_length: int | None) -> tuple[list, dict[int, str],
                                                                                     dict[int, list[int]]]:
    """(the questions of ``todo`` whose teacher prompt has at most ``max_prompt_length`` tokens (None: all),
    {index: prompt}, {index: prompt token ids}); longer ones are dropped and counted in the log, as rlt.train
    does."""
    from rlt.data.loading import prompt_ids_within
    from rlt.data.text import teacher_prompt

    if not todo:
        return todo, {}, {}
    prompts = [teacher_prompt(tokenizer, ex.question, ex.solution, fmt) for _, ex in todo]
    kept = prompt_ids_within(tokenizer, prompts, max_prompt_length)
    return ([todo[k] for k in kept], {todo[k][0]: prompts[k] for k in kept},
            {todo[k][0]: ids for k, ids in kept.items()})


def new_totals() -> dict[str, int]:
    """The counters one distillation call adds up: :func:`select_rows`' counts and the rows written."""
    return {"explanations": 0, "no_end_tag": 0, "tags_in_thought": 0, "questions_without_rows": 0, "rows": 0}


COUNTED = ("explanations", "no_end_tag", "tags_in_thought")  # summed over the calls that wrote one output


def write_summary(path: Path, progress: Path, totals: dict, cfg: DistillConfig, n_questions: int,
                  resumed: bool) -> None:
    """``path`` describes the whole output file: its rows and questions, the dataset's questions without a row,
    and the explanations (and those without end tag) generated for it over the finished calls (this call's
    counts plus the earlier summary's when this call resumed the file); ``last_call``: this call's counts."""
    rows = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    questions = {r["source_index"] for r in rows}
    earlier = previous_counts(path) if resumed else {}
    summary = {"rows": len(rows), "questions": len(questions),
               "questions_without_rows": sum(i not in questions for i in range(n_questions)),
               **{k: earlier.get(k, 0) + totals[k] for k in COUNTED},
               "select": cfg.select, "num_explanations": cfg.num_explanations, "last_call": totals}
    path.write_text(json.dumps(summary, indent=2))


def previous_counts(path: Path) -> dict:
    """The counts of an earlier summary (empty when there is none or it is unreadable, logged)."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        return {k: int(old.get(k, 0)) for k in COUNTED}  # a summary from before tags_in_thought lacks it
    except (ValueError, KeyError, TypeError):
        logger.warning("%s: earlier summary unreadable; its counts are not carried over", path)
        return {}


if __name__ == "__main__":
    main()

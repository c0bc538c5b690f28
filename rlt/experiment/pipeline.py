"""The experiment's plan: presets, the jobs of a run and of the learning-curve study.

A run (``python -m rlt.experiment run [--quick]``):

  1. students on the raw traces, one per seed; seed 0's is also the frozen reward student (as in the paper,
     where the student that scores explanations was itself trained on reasoning traces)
  2. teacher SFT warm-up on the same raw traces (question + solution -> explanation)
  3. teacher GRPO from the warm-up, rewarded by the seed-0 raw student
  4. distillation, best-of-k by the teacher reward, with the RL teacher and (ablation) the warm-up teacher
  5. fresh students on (b) RL-teacher and (c) warm-up-teacher explanations, same token budget as (a)
  6. greedy evaluation of every student on the held-out test split; the RL teacher's rewards on the test
     questions (for the reward/gain correlation) and the reward of gold raw vs. fully worked traces

Splits come from rlt/data/arithmetic.py (disjoint by a hash of the question). Nothing is tuned on the test
split: every setting below was fixed from the learning-curve study (validation split) before the run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rlt.data.arithmetic import TEACHER_SYSTEM_PROMPT
from rlt.experiment.jobs import Job


@dataclasses.dataclass(frozen=True)
class Preset:
    n_train: int            # training questions (raw traces; also the RL prompts and the distilled questions)
    n_val: int              # validation questions (learning curves only)
    n_test: int             # held-out test questions
    seeds: tuple[int, ...]  # student seeds (initialisation and data order)
    shape: str              # model shape (rlt.experiment.runner.SHAPES), teacher and students alike
    student_tokens: int     # token budget of every student (and of the teacher warm-up)
    rl_steps: int
    rl_prompts: int         # prompts per RL step
    rl_generations: int     # explanations per prompt (GRPO group)
    rl_lr: float
    k: int                  # explanations per question at distillation (best-of-k)
    n_analysis: int         # test questions the RL teacher explains for the reward/gain correlation
    max_tokens: int = 96    # longest explanation / student answer
    batch: int = 32         # SFT batch (examples per step)
    val_every: int = 100    # seed-0 students: validation accuracy every this many steps (their learning curves)


PRESETS = {
    "default": Preset(n_train=4000, n_val=200, n_test=400, seeds=(0, 1, 2), shape="h128-l2",
                      student_tokens=1_500_000, rl_steps=120, rl_prompts=8, rl_generations=8, rl_lr=5e-5, k=4,
                      n_analysis=400),
    "quick": Preset(n_train=128, n_val=32, n_test=48, seeds=(0, 1), shape="h128-l2", student_tokens=40_000,
                    rl_steps=4, rl_prompts=2, rl_generations=4, rl_lr=5e-5, k=2, n_analysis=16, batch=16, val_every=10),
}
TEACHER_SEED = 100
VARIANTS = {"raw": "raw traces", "rlt": "RL-teacher explanations", "warmup": "warm-up-teacher explanations"}


def data_ids(p: Preset) -> dict[str, str]:
    return {"train": f"rlt-arith:train:{p.n_train}:0", "val": f"rlt-arith:validation:{p.n_val}:0",
            "test": f"rlt-arith:test:{p.n_test}:0", "analysis": f"rlt-arith:test:{p.n_analysis}:0",
            "train_full": f"rlt-arith:train:{p.n_train}:0:trace-full"}


def plan(out: Path, p: Preset, device: str) -> list[Job]:
    """The jobs of one run, in priority order (the critical path first)."""
    d = data_ids(p)
    m = out / "models"
    logs = out / "logs"
    cpu = ["+use_cpu=true"] if device == "cpu" else []
    jobs = [Job("models", "build_models", dict(out=str(m), shape=p.shape, seeds=[*p.seeds, TEACHER_SEED]),
                str(logs / "0_models.log"), title="build tiny models")]
    budget = dict(token_budget=p.student_tokens)

    def student(variant: str, seed: int, data: str, deps: tuple[str, ...]) -> Job:
        curve = dict(val=d["val"], eval_every=p.val_every, max_tokens=p.max_tokens) if seed == p.seeds[0] else {}
        return Job(f"student_{variant}_s{seed}", "sft",
                   dict(name="student_sft", label=f"student {variant} s{seed}", **budget, **curve,
                        overrides=[f"model_name_or_path={m / f'init_s{seed}'}", f"dataset_id_or_path={data}",
                                   f"output_dir={m / f'student_{variant}_s{seed}'}", f"seed={seed}",
                                   f"train_batch_size={p.batch}", f"per_device_train_batch_size={p.batch}", *cpu]),
                   str(logs / f"1_student_{variant}_s{seed}.log"), deps=("models", *deps),
                   title=f"student on {VARIANTS[variant]}, seed {seed}")

    def evaluate(variant: str, seed: int) -> Job:
        return Job(f"eval_{variant}_s{seed}", "evaluate",
                   dict(model=str(m / f"student_{variant}_s{seed}"), data=d["test"],
                        out_dir=str(out / "eval" / f"{variant}_s{seed}"), device=device, max_tokens=p.max_tokens),
                   str(logs / f"5_eval_{variant}_s{seed}.log"), deps=(f"student_{variant}_s{seed}",),
                   title=f"evaluate student {variant} s{seed} on {p.n_test} test questions")

    reward_student = str(m / f"student_raw_s{p.seeds[0]}")
    teacher_warm = str(m / "teacher_warmup")
    teacher_rl = str(m / "teacher_rl")
    jobs += [
        student("raw", p.seeds[0], d["train"], ()),
        Job("teacher_warmup", "sft",
            dict(name="teacher_sft", label="teacher warm-up", **budget,
                 overrides=[f"model_name_or_path={m / f'init_s{TEACHER_SEED}'}", f"dataset_id_or_path={d['train']}",
                            f"output_dir={teacher_warm}", f"seed={TEACHER_SEED}", f"train_batch_size={p.batch}",
                            f"per_device_train_batch_size={p.batch}", *cpu]),
            str(logs / "2_teacher_warmup.log"), deps=("models",), title="teacher SFT warm-up on the raw traces"),
        Job("teacher_rl", "grpo",
            dict(label="teacher RL",
                 overrides=[f"model_name_or_path={teacher_warm}", f"student_model={reward_student}",
                            f"dataset_id_or_path={d['train']}", f"output_dir={teacher_rl}", f"max_steps={p.rl_steps}",
                            f"train_batch_size={p.rl_prompts * p.rl_generations}",
                            f"per_device_train_batch_size={p.rl_prompts * p.rl_generations}",
                            f"num_generations={p.rl_generations}", f"learning_rate={p.rl_lr}",
                            f"max_completion_length={p.max_tokens}", f"reward_micro_batch_size={p.rl_prompts * p.rl_generations}",
                            f"seed={TEACHER_SEED}", *cpu]),
            str(logs / "3_teacher_rl.log"), deps=("teacher_warmup", f"student_raw_s{p.seeds[0]}"),
            title=f"teacher RL ({p.rl_steps} steps x {p.rl_prompts} prompts x {p.rl_generations} explanations), "
                  f"reward student = raw student s{p.seeds[0]}"),
        Job("score_gold", "score_gold",
            dict(teacher=teacher_warm, student=reward_student, raw=d["val"], full=d["val"] + ":trace-full",
                 out=str(out / "analysis" / "gold_trace_rewards.json"), device=device),
            str(logs / "3_score_gold.log"), deps=("teacher_warmup", f"student_raw_s{p.seeds[0]}"),
            title="reward of the gold raw vs fully worked traces (validation questions)"),
    ]
    jobs += [student("raw", s, d["train"], ()) for s in p.seeds[1:]]
    for variant, teacher in (("warmup", teacher_warm), ("rlt", teacher_rl)):
        jobs.append(Job(f"distill_{variant}", "distill",
                        dict(teacher=teacher, student=reward_student, data=d["train"],
                             output=str(out / "distill" / f"{variant}.jsonl"), device=device, num_explanations=p.k,
                             max_tokens=p.max_tokens, teacher_system_prompt=TEACHER_SYSTEM_PROMPT),
                        str(logs / f"4_distill_{variant}.log"),
                        deps=("teacher_rl" if variant == "rlt" else "teacher_warmup", f"student_raw_s{p.seeds[0]}"),
                        title=f"distillation with the {'RL' if variant == 'rlt' else 'warm-up'} teacher "
                              f"({p.n_train} questions, best of {p.k})"))
    jobs.append(Job("analysis_rewards", "distill",
                    dict(teacher=teacher_rl, student=reward_student, data=d["analysis"],
                         output=str(out / "analysis" / "test_explanations.jsonl"), device=device,
                         num_explanations=p.k, max_tokens=p.max_tokens, seed=1,
                         teacher_system_prompt=TEACHER_SYSTEM_PROMPT),
                    str(logs / "6_analysis_rewards.log"), deps=("teacher_rl",),
                    title=f"RL teacher's rewards on {p.n_analysis} test questions (reward/gain analysis only)"))
    for variant in ("warmup", "rlt"):
        jobs += [student(variant, s, str(out / "distill" / f"{variant}.jsonl"), (f"distill_{variant}",))
                 for s in p.seeds]
    jobs += [evaluate(v, s) for v in VARIANTS for s in p.seeds]
    # Priority: the critical path (reward student + warm-up -> RL -> RLT distillation -> RLT students) first.
    order = ["models", f"student_raw_s{p.seeds[0]}", "teacher_warmup", "teacher_rl", "distill_rlt",
             *[f"student_rlt_s{s}" for s in p.seeds]]
    return sorted(jobs, key=lambda j: order.index(j.name) if j.name in order else len(order))


# ----------------------------------------------------------------------------------------- learning curves
CURVE_SHAPES = ("h128-l2", "h128-l4", "h256-l4")


def curve_plan(out: Path, shapes=CURVE_SHAPES, traces=("raw", "full"), steps: int = 400, eval_every: int = 50,
               n_train: int = 2000, n_val: int = 200, batch: int = 32) -> list[Job]:
    """Validation accuracy of students trained on raw vs fully worked traces, per model shape."""
    jobs = []
    tag = "" if n_train == 2000 else f"_n{n_train}"
    for shape in shapes:
        jobs.append(Job(f"models_{shape}", "build_models", dict(out=str(out / "models" / shape), shape=shape, seeds=[0]),
                        str(out / "logs" / f"models_{shape}.log"), title=f"build {shape}"))
        for trace in traces:
            jobs.append(Job(
                f"curve_{shape}{tag}_{trace}", "curve",
                dict(init=str(out / "models" / shape / "init_s0"), train=f"rlt-arith:train:{n_train}:0:trace-{trace}",
                     val=f"rlt-arith:validation:{n_val}:0:trace-{trace}", out_dir=str(out / f"{shape}{tag}_{trace}"),
                     steps=steps, eval_every=eval_every, max_tokens=96, label=f"curve {shape} {trace}",
                     extra=[f"train_batch_size={batch}", f"per_device_train_batch_size={batch}", "+use_cpu=true"]),
                str(out / "logs" / f"curve_{shape}{tag}_{trace}.log"), deps=(f"models_{shape}",),
                title=f"learning curve {shape}, {trace} traces, {n_train} questions"))
    return jobs

"""The experiment's jobs (run by rlt.experiment.jobs in worker processes); each returns a JSON-able dict."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rlt.experiment import runner

logger = logging.getLogger("rlt.experiment")
RECIPES = Path(__file__).resolve().parents[2] / "cfgs" / "experiment"


def recipe(name: str) -> str:
    return str(RECIPES / f"{name}.yaml")


def thought_of(output: str) -> str | None:
    """The thought section of a student output (None when it never opened one)."""
    from rlt.data.formats import FORMATS

    t0, t1 = FORMATS["bespoke_stratos"].think_tags
    if t0 not in output:
        return None
    body = output.split(t0, 1)[1]
    return body.split(t1, 1)[0]


def output_stats(results: list[dict]) -> dict:
    """Shape of the students' own reasoning on the evaluated questions: how often a thought folds steps,
    and accuracy with and without folded steps (first sample of each question)."""
    from rlt.data.arithmetic import trace_stats

    n = folded = parsed = wrong = 0
    acc = {"folded": [], "unfolded": []}
    for r in results:
        th = thought_of(r["outputs"][0])
        n += 1
        if th is None:
            continue
        st = trace_stats(th)
        if not st["parsed"]:
            continue
        parsed += 1
        wrong += st["wrong_steps"] > 0
        key = "folded" if st["folded_steps"] else "unfolded"
        folded += key == "folded"
        acc[key].append(float(r["correct"][0]))
    return {"outputs": n, "parsed": parsed, "folded_frac": folded / max(1, parsed),
            "with_wrong_step_frac": wrong / max(1, parsed),
            "acc_folded": sum(acc["folded"]) / len(acc["folded"]) if acc["folded"] else None,
            "acc_unfolded": sum(acc["unfolded"]) / len(acc["unfolded"]) if acc["unfolded"] else None}


# ----------------------------------------------------------------------------------------- jobs
def build_models(out: str, shape: str, seeds: list[int]) -> dict:
    paths = {s: str(runner.build_tiny(Path(out) / f"init_s{s}", s, shape)) for s in seeds}
    return {"paths": paths}


def sft(name: str, overrides: list[str], label: str, token_budget: int | None = None, val: str | None = None,
        eval_every: int = 0, max_tokens: int = 96) -> dict:
    """SFT (recipe cfgs/experiment/NAME.yaml); with ``val``, greedy accuracy on it every ``eval_every`` steps."""
    callbacks, points = [], []
    if val and eval_every:
        init = next(o.split("=", 1)[1] for o in overrides if o.startswith("model_name_or_path="))
        callbacks.append(val_curve_callback(init, val, eval_every, max_tokens, label, points))
    out = runner.train_sft(recipe(name), overrides, label, callbacks=callbacks, token_budget=token_budget)
    if points:
        out["val_curve"] = points
    return out


def grpo(overrides: list[str], label: str) -> dict:
    out = runner.train_grpo(recipe("teacher_rlt"), overrides, label)
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    try:
        from rlt.plot import plot

        plot(run_dir)
    except Exception as e:  # noqa: BLE001  (a plot is not worth failing the run for)
        logger.warning("plotting %s failed: %s", run_dir, e)
    return out


def distill(teacher: str, student: str, data: str, output: str, device: str, num_explanations: int,
            max_tokens: int, teacher_system_prompt: str, seed: int = 0) -> dict:
    return runner.distill(teacher, student, data, Path(output), runner.device_of(device), num_explanations,
                          max_tokens, seed=seed, teacher_system_prompt=teacher_system_prompt)


def evaluate(model: str, data: str, out_dir: str, device: str, max_tokens: int) -> dict:
    summary = runner.evaluate_model(model, data, Path(out_dir), runner.device_of(device), max_tokens)
    results = [json.loads(line) for line in open(Path(out_dir) / "results.jsonl")]
    summary["shape"] = output_stats(results)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("%s: accuracy %.3f on %d questions (%s)", Path(out_dir).name, summary["accuracy"],
                summary["questions"], data.split(":")[1] if data.startswith("rlt-arith:") else data)
    return summary


def val_curve_callback(init: str, val: str, eval_every: int, max_tokens: int, label: str, points: list):
    """A TrainerCallback appending {step, tokens, train_seconds, accuracy, ...} on ``val`` to ``points`` every
    ``eval_every`` steps and at the end (evaluation time is not counted as training time)."""
    from transformers import TrainerCallback

    from rlt.models import load_tokenizer

    rows, fmt = runner.eval_rows_of(val)
    tok = load_tokenizer(init)

    class _Eval(TrainerCallback):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.eval_s = 0.0

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % eval_every and state.global_step != state.max_steps:
                return
            t = time.perf_counter()
            engine = runner.HFEngine(model, tok, next(model.parameters()).device)
            results, summary = runner.evaluate_loaded(engine, rows, fmt, max_tokens)
            model.train()
            self.eval_s += time.perf_counter() - t
            p = {"step": state.global_step, "tokens": int(state.num_input_tokens_seen or 0),
                 "train_seconds": time.perf_counter() - self.t0 - self.eval_s, "accuracy": summary["accuracy"],
                 "no_answer": summary["no_answer"], **output_stats(results)}
            points.append(p)
            logger.info("%s: step %d validation accuracy %.3f (thoughts folding steps %.2f)", label, p["step"],
                        p["accuracy"], p["folded_frac"])

    return _Eval()


def curve(init: str, train: str, val: str, out_dir: str, steps: int, eval_every: int, max_tokens: int,
          seed: int = 0, label: str = "curve", extra: list[str] | None = None) -> dict:
    """Student SFT with greedy validation accuracy every ``eval_every`` steps (the learning-curve study)."""
    points: list[dict] = []
    out = runner.train_sft(recipe("student_sft"), [f"model_name_or_path={init}", f"dataset_id_or_path={train}",
                                                   f"max_steps={steps}", f"output_dir={out_dir}", f"seed={seed}",
                                                   "save_final_model=false", *(extra or [])],
                           label, callbacks=[val_curve_callback(init, val, eval_every, max_tokens, label, points)])
    result = {**out, "points": points, "train": train, "val": val, "init": init}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "curve.json").write_text(json.dumps(result, indent=2))
    return result


def score_gold(teacher: str, student: str, raw: str, full: str, out: str, device: str) -> dict:
    """The teacher reward (this teacher's log-probs, the reward student) of the gold traces of the same
    questions written two ways: raw (steps folded as the raw data folds them) and fully worked. Shows which
    kind of explanation the reward prefers before any RL."""
    import torch

    from rlt.data.config import DataConfig, FormatConfig
    from rlt.data.loading import load_dataset_examples
    from rlt.data.text import student_system, teacher_prompt_and_completion
    from rlt.stats import mean_se
    from rlt.models import load_causal_lm, load_tokenizer
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.teacher_reward import RewardInput, TeacherReward

    from rlt.data.arithmetic import TEACHER_SYSTEM_PROMPT, trace_stats

    dev = runner.device_of(device)
    tok = load_tokenizer(teacher)
    fmt_cfg = FormatConfig(teacher_system_prompt=TEACHER_SYSTEM_PROMPT)
    reward = TeacherReward(load_causal_lm(student, "float32").to(dev).eval(), tok, None, RewardConfig(student_model=student),
                           teacher_temperature=0.7)
    teacher_model = load_causal_lm(teacher, "float32").to(dev).eval()
    res = {}
    per_q = {}
    for name, data in (("raw", raw), ("full", full)):
        exs, fmt = load_dataset_examples(DataConfig(dataset_id_or_path=data), fmt_cfg)
        reward.fmt = fmt
        items = []
        for ex in exs:
            prompt, completion = teacher_prompt_and_completion(tok, ex, fmt)
            items.append(RewardInput(prompt, completion.removesuffix(tok.eos_token), ex.question, ex.solution,
                                     student_system(ex.system, fmt)))
        with torch.no_grad():
            r = reward(teacher_model, items)
        folded = [trace_stats(ex.thought)["folded_steps"] > 0 for ex in exs]
        per_q[name] = r.rewards.tolist()
        comps = {k: mean_se(v.tolist()) for k, v in r.components.items() if k in ("reward", "r_ss", "r_kl")}
        res[name] = {k: {"mean": m, "se": s} for k, (m, s) in comps.items()}
        res[name]["folded_frac"] = sum(folded) / len(folded)
        res[name]["n"] = len(exs)
        if name == "raw":
            f = [x for x, fo in zip(per_q[name], folded) if fo]
            u = [x for x, fo in zip(per_q[name], folded) if not fo]
            res["raw_folded_reward"] = dict(zip(("mean", "se"), mean_se(f))) if f else None
            res["raw_unfolded_reward"] = dict(zip(("mean", "se"), mean_se(u))) if len(u) > 1 else None
    diff = [b - a for a, b in zip(per_q["raw"], per_q["full"])]
    res["full_minus_raw"] = dict(zip(("mean", "se"), mean_se(diff)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
    logger.info("gold traces under the reward: raw %.3f, fully worked %.3f (paired difference %.3f +- %.3f)",
                res["raw"]["reward"]["mean"], res["full"]["reward"]["mean"], res["full_minus_raw"]["mean"],
                res["full_minus_raw"]["se"])
    return res

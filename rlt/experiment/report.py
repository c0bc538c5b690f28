"""summary.json, report.md and the plots of an experiment run (and of the learning-curve study)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from rlt import stats
from rlt.cli import read_json

logger = logging.getLogger("rlt.experiment")
COMPONENTS = [  # (log key, label) of every reward component the RL stage logs, in plotting order
    ("reward", "reward (r_SS - r_KL + match penalty)"),
    ("teacher_reward/r_ss", "r_SS (weighted solution log-prob)"),
    ("teacher_reward/r_kl", "r_KL (weighted thought KL)"),
    ("teacher_reward/r_ss/mean", "r_SS mean term (1.0 x mean)"),
    ("teacher_reward/r_ss/min", "r_SS min term (0.01 x min)"),
    ("teacher_reward/r_kl/mean", "r_KL mean term (3.0 x mean)"),
    ("teacher_reward/r_kl/max", "r_KL max term (0.03 x max)"),
    ("teacher_reward/match_penalty", "match penalty (missing end tag)"),
    ("teacher_reward/solution_log_prob/mean", "student's mean solution log-prob"),
    ("teacher_reward/thought_kl/mean", "mean thought KL (teacher - student)"),
    ("completions/mean_length", "explanation length (tokens)"),
    ("kl", "KL to the reference teacher"),
]


def _read(path: Path):
    return read_json(path)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def rl_history(run_dir: Path) -> list[dict]:
    state = _read(run_dir / "trainer_state.json") or {}
    return [h for h in state.get("log_history", []) if "reward" in h]


def reward_windows(hist: list[dict], window: int = 10) -> dict:
    """Mean +- SE of the reward over the first and last ``window`` steps, and the z-score of the rise."""
    r = [h["reward"] for h in hist]
    w = max(1, min(window, len(r) // 2))
    out = stats.rise_z(r[:w], r[-w:]) if len(r) >= 2 else {}
    out["window"] = w
    out["steps"] = len(r)
    return out


def explanation_stats(rows: list[dict], selected: list[dict] | None = None) -> dict:
    """Shape of teacher explanations: folded steps, arithmetic slips, unparsed, mean reward (+ components)."""
    from rlt.data.arithmetic import trace_stats
    from rlt.data.formats import FORMATS
    from rlt.rewards.teacher_reward import extract_thought

    fmt = FORMATS["bespoke_stratos"]
    n = len(rows)
    if not n:
        return {"n": 0}
    thoughts = [extract_thought(r["completion"], fmt) for r in rows]  # (thought, completion, had the end tag)
    st = [trace_stats(t[0]) for t in thoughts]
    out = {"n": n, "folded_frac": sum(s["folded_steps"] > 0 for s in st) / n,
           "wrong_frac": sum(s["wrong_steps"] > 0 for s in st) / n,
           "unparsed_frac": sum(not s["parsed"] for s in st) / n,
           "no_end_tag_frac": sum(not t[2] for t in thoughts) / n}
    for k in ("reward", "r_ss", "r_kl", "thought_tokens"):
        vals = [r[k] for r in rows if k in r and r[k] == r[k]]
        if vals:
            out[k] = stats.mean(vals)
    return out


def selected_stats(distilled: Path) -> dict:
    """Shape of the explanations distillation kept (one per question); ``no_end_tag_frac``: the share kept
    without the end tag (cut off at the token budget, kept with the penalty)."""
    from rlt.data.arithmetic import trace_stats
    from rlt.data.examples import parse_stratos_row
    from rlt.data.formats import FORMATS

    rows = _jsonl(distilled)
    if not rows:
        return {"n": 0}
    st = [trace_stats(parse_stratos_row(r, FORMATS["bespoke_stratos"]).thought) for r in rows]
    n = len(st)
    return {"n": n, "folded_frac": sum(s["folded_steps"] > 0 for s in st) / n,
            "wrong_frac": sum(s["wrong_steps"] > 0 for s in st) / n,
            "unparsed_frac": sum(not s["parsed"] for s in st) / n,
            "steps_mean": stats.mean([s["steps"] for s in st]),
            "no_end_tag_frac": (sum(not r["end_tag"] for r in rows) / n) if all("end_tag" in r for r in rows) else None,
            "reward": stats.mean([r["reward"] for r in rows]) if "reward" in rows[0] else None}


def raw_trace_stats(data_id: str) -> dict:
    from rlt.data.arithmetic import generate_rows, parse_id, trace_stats

    split, n, seed, task = parse_id(data_id)
    st = [trace_stats(r["reasoning_trace"]) for r in generate_rows(split, n, seed, task)]
    return {"n": len(st), "folded_frac": sum(s["folded_steps"] > 0 for s in st) / len(st), "wrong_frac": 0.0,
            "unparsed_frac": 0.0, "steps_mean": stats.mean([s["steps"] for s in st])}


def per_question_correct(eval_dir: Path) -> dict[str, float]:
    return {r["question"]: r["accuracy"] for r in _jsonl(eval_dir / "results.jsonl")}


def reward_gain(out: Path, seeds, a: str = "rlt", b: str = "raw") -> dict:
    """Per test question: the RL teacher's mean reward over its k explanations, and the gain of the ``a``
    students over the ``b`` students (mean over seeds of correct_a - correct_b); Pearson's r (Fisher CI) and
    Spearman's rho."""
    expl = _jsonl(out / "analysis" / "test_explanations.explanations.jsonl")
    by_q: dict[str, list[float]] = {}
    for r in expl:
        by_q.setdefault(r["question"], []).append(r["reward"])
    ca = [per_question_correct(out / "eval" / f"{a}_s{s}") for s in seeds]
    cb = [per_question_correct(out / "eval" / f"{b}_s{s}") for s in seeds]
    xs, ys = [], []
    for q, rs in by_q.items():
        if all(q in c for c in ca + cb):
            xs.append(stats.mean(rs))
            ys.append(stats.mean([x[q] - y[q] for x, y in zip(ca, cb)]))
    res = stats.pearson(xs, ys) if len(xs) >= 2 else {"r": float("nan"), "ci95": [float("nan")] * 2, "n": len(xs)}
    res["spearman"] = stats.spearman(xs, ys) if len(xs) >= 2 else float("nan")
    res["points"] = list(zip(xs, ys))
    return res


# ----------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, png: Path) -> Path:
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def plot_components(hist: list[dict], png: Path) -> Path | None:
    present = [(k, lab) for k, lab in COMPONENTS if any(k in h for h in hist)]
    if not present:
        return None
    plt = _plt()
    cols = 3
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(14, 2.9 * rows), squeeze=False)
    for ax, (k, lab) in zip(axes.flat, present):
        pts = [(h["step"], h[k]) for h in hist if k in h and h[k] == h[k]]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.6, marker=".", ms=3)
        w = 10
        if len(ys) >= w:
            roll = [stats.mean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, roll, lw=2, label=f"mean of last {w}")
            ax.legend(fontsize=7)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle("teacher RL: every reward component per step")
    return _save(plt, fig, png)


def plot_accuracy(acc: dict, png: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, a) in enumerate(acc.items()):
        ax.scatter([i] * len(a["values"]), a["values"], color="gray", s=18, zorder=3, label="seeds" if i == 0 else None)
        err = a["ci95"] if a["ci95"] == a["ci95"] else 0
        ax.errorbar([i], [a["mean"]], yerr=[err], fmt="o", color="C0", capsize=6, ms=8, zorder=4,
                    label="mean, 95% CI" if i == 0 else None)
    ax.set_xticks(range(len(acc)), list(acc), fontsize=8)
    ax.set_ylabel("test accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(plt, fig, png)


def plot_reward_gain(points, png: Path) -> Path | None:
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, alpha=0.5)
    ax.set_xlabel("RL teacher's mean reward on the question")
    ax.set_ylabel("gain: RLT students - raw students")
    ax.grid(alpha=0.3)
    return _save(plt, fig, png)


def plot_val_curves(curves: dict[str, list[dict]], png: Path) -> Path | None:
    """Validation accuracy along training of the seed-0 students of a run."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, pts in curves.items():
        ax.plot([p["tokens"] / 1e6 for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation accuracy (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, png)


def plot_curves(curves: list[dict], png: Path) -> Path | None:
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for c in curves:
        pts = c["points"]
        style = "-" if c["trace"] == "full" else "--"
        label = f"{c['shape']} ({c['params'] / 1e6:.2f}M), {c['n_train']} q, {c['trace']} traces"
        axes[0].plot([p["step"] for p in pts], [p["accuracy"] for p in pts], style, marker="o", ms=3, label=label)
        axes[1].plot([p["train_seconds"] / 60 for p in pts], [p["accuracy"] for p in pts], style, marker="o", ms=3,
                     label=label)
    axes[0].set_xlabel("optimizer step (batch 32)")
    axes[1].set_xlabel("training minutes (threads and load: curves.md)")
    for ax in axes:
        ax.set_ylabel("validation accuracy (greedy)")
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle("learning curves: students on the running-sum task")
    return _save(plt, fig, png)


# ----------------------------------------------------------------------------------------- texts
def _pm(m, se, nd=3):
    return f"{m:.{nd}f} ± {se:.{nd}f}"


def _acc(a: dict) -> str:
    return f"{a['mean']:.3f} ± {a['ci95']:.3f}" if a["ci95"] == a["ci95"] else f"{a['mean']:.3f}"


def _best_per_question(expl_rows: list[dict], n: int) -> list[dict]:
    """The best-rewarded explanation of each of the first ``n`` questions (what distillation kept)."""
    by_q: dict[str, dict] = {}
    for r in expl_rows:
        q = r["question"]
        if q not in by_q and len(by_q) >= n:
            continue
        if q not in by_q or r["reward"] > by_q[q]["reward"]:
            by_q[q] = r
    return list(by_q.values())


def recipe_settings() -> dict:
    """The settings the report quotes, read from the experiment's recipes (cfgs/experiment), not restated."""
    from rlt.config import compose
    from rlt.experiment.stages import recipe
    from rlt.rewards.config import RewardConfig

    student, rl = compose(recipe("student_sft")), compose(recipe("teacher_rlt"))
    reward = RewardConfig()
    return {"student_lr": student["learning_rate"], "student_schedule": student["lr_scheduler_type"],
            "rl_temperature": rl["temperature"], "rl_beta": rl["beta"],
            "alpha": list(rl.get("answer_log_prob_coeff", reward.answer_log_prob_coeff)),
            "lambda": list(rl.get("kl_penalty_reward_coeff", reward.kl_penalty_reward_coeff))}


def write_curves_report(out: Path) -> dict:
    """curves.json + curves.png + curves.md of the learning-curve study in ``out`` (every */curve.json)."""
    from rlt.data.arithmetic import ArithTask
    from rlt.experiment.runner import SHAPES

    rs = recipe_settings()

    curves = []
    for f in sorted(out.glob("*/curve.json")):
        c = json.loads(f.read_text())
        parts = f.parent.name.split("_")
        shape, trace = parts[0], parts[-1]
        cfg_path = Path(c["init"]) / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {
            "vocab_size": 579, "hidden_size": SHAPES[shape]["hidden_size"],
            "num_hidden_layers": SHAPES[shape]["num_layers"], "intermediate_size": SHAPES[shape]["intermediate_size"]}
        params = (cfg["vocab_size"] * cfg["hidden_size"] * 2 + cfg["num_hidden_layers"] * (
            4 * cfg["hidden_size"] ** 2 + 3 * cfg["hidden_size"] * cfg["intermediate_size"]))
        curves.append({"shape": shape, "trace": trace, "params": params, "n_train": c["examples"], **c})
    plot_curves(curves, out / "curves.png")
    (out / "curves.json").write_text(json.dumps(curves, indent=2))
    lines = ["# Learning-curve study", "", "Validation accuracy (greedy, 200 validation questions) of students trained "
             f"on the raw traces (steps folded with probability {ArithTask().merge_prob}) and on fully worked traces, "
             f"per model shape and number of training questions (batch 32, learning rate {rs['student_lr']:g}, "
             f"{rs['student_schedule']} schedule over the steps shown).",
             "", "![learning curves](curves.png)", "",
             "| shape | params | questions | traces | steps | tokens | train min | final val acc | best val acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in curves:
        pts = c["points"]
        lines.append(f"| {c['shape']} | {c['params'] / 1e6:.2f}M | {c['n_train']} | {c['trace']} | {c['steps']} | "
                     f"{c['tokens']:,} | {pts[-1]['train_seconds'] / 60:.1f} | {pts[-1]['accuracy']:.3f} | "
                     f"{max(p['accuracy'] for p in pts):.3f} |")
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    return {"curves": curves}


def summarize(out: Path, preset_name: str, preset, meta: dict) -> dict:
    """summary.json of a run (every key the issue asks for, plus the evidence behind them)."""
    from rlt.experiment.pipeline import VARIANTS, data_ids

    seeds = list(preset.seeds)
    hist = rl_history(out / "models" / "teacher_rl")
    win = reward_windows(hist)
    acc, shape, no_answer = {}, {}, {}
    for v in VARIANTS:
        sums = [_read(out / "eval" / f"{v}_s{s}" / "summary.json") or {} for s in seeds]
        acc[v] = stats.mean_ci95([x.get("accuracy", float("nan")) for x in sums])
        shape[v] = [x.get("shape") for x in sums]
        no_answer[v] = [x.get("no_answer") for x in sums]   # outputs cut off (token budget) or without an answer
    diff = {f"{a}_minus_{b}": stats.mean_ci95([x - y for x, y in zip(acc[a]["values"], acc[b]["values"])])
            for a, b in (("rlt", "raw"), ("rlt", "warmup"), ("warmup", "raw"))}
    rg = reward_gain(out, seeds)
    d = data_ids(preset)
    jobs = (_read(out / "jobs.json") or {}).get("results", {})
    val_curves = {v: jobs.get(f"student_{v}_s{seeds[0]}", {}).get("val_curve", []) for v in VARIANTS}
    budgets = {k: {"steps": r.get("steps"), "tokens": r.get("tokens"), "examples": r.get("examples")}
               for k, r in jobs.items() if k.startswith(("student_", "teacher_warmup"))}
    expl = {v: explanation_stats(_jsonl(out / "distill" / f"{v}.explanations.jsonl")) for v in ("warmup", "rlt")}
    sel = {"raw": raw_trace_stats(d["train"]),
           **{v: selected_stats(out / "distill" / f"{v}.jsonl") for v in ("warmup", "rlt")}}
    return {
        "task": (f"running sums of 4-7 single digits (rlt-arith), raw traces fold steps with probability 0.35; "
                 f"train {preset.n_train} / test {preset.n_test} questions"),
        "preset": preset_name, "seeds": seeds,
        "reward_first10_mean": win.get("first_mean"), "reward_first10_se": win.get("first_se"),
        "reward_last10_mean": win.get("last_mean"), "reward_last10_se": win.get("last_se"),
        "reward_rise_z": win.get("z"), "reward_rise_df": win.get("df"), "reward_rise_crit": win.get("crit"),
        "reward_window": win.get("window"), "rl_steps": win.get("steps"),
        "acc_raw": {"mean": acc["raw"]["mean"], "ci95": acc["raw"]["ci95"]},
        "acc_rlt": {"mean": acc["rlt"]["mean"], "ci95": acc["rlt"]["ci95"]},
        "acc_warmup": {"mean": acc["warmup"]["mean"], "ci95": acc["warmup"]["ci95"]},
        "acc_per_seed": {v: acc[v]["values"] for v in acc},
        "acc_paired_differences": {k: {"mean": v["mean"], "ci95": v["ci95"]} for k, v in diff.items()},
        "reward_gain_correlation": {"pearson_r": rg["r"], "pearson_ci95": rg["ci95"], "spearman_rho": rg["spearman"],
                                    "questions": rg["n"],
                                    "definition": "per test question: the RL teacher's mean reward over its k "
                                                  "explanations vs (RLT students' accuracy - raw students' "
                                                  "accuracy), averaged over seeds"},
        "explanations_all_k": expl, "explanations_selected": sel,
        "student_outputs": shape, "no_answer_per_seed": no_answer, "val_curves_seed0": val_curves, "training_budgets": budgets,
        "gold_trace_rewards": _read(out / "analysis" / "gold_trace_rewards.json"),
        "minutes": meta.get("minutes"), "load_average": meta.get("load"), "device": meta.get("device"),
        "models": meta.get("models"), "jobs": meta.get("jobs"), "code": meta.get("code"),
    }


def write_report(out: Path, summary: dict, preset) -> Path:
    """report.md with the plots embedded (paths relative to ``out``)."""
    from rlt.experiment.pipeline import VARIANTS

    rs = recipe_settings()
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    s = summary
    hist = rl_history(out / "models" / "teacher_rl")
    comp_png = plot_components(hist, plots / "reward_components.png")
    acc = {"(a) raw": {**s["acc_raw"], "values": s["acc_per_seed"]["raw"]},
           "(b) RLT": {**s["acc_rlt"], "values": s["acc_per_seed"]["rlt"]},
           "(c) warm-up": {**s["acc_warmup"], "values": s["acc_per_seed"]["warmup"]}}
    plot_accuracy(acc, plots / "accuracy.png")
    rg_png = plot_reward_gain(reward_gain(out, s["seeds"])["points"], plots / "reward_gain.png")
    curves_dir = out / "curves"
    load = s.get("load_average") or {}
    m = s.get("models") or {}
    L = [f"# Does it teach? A micro-scale RLT experiment ({s['preset']})", ""]
    L += [f"Wall time **{s['minutes']:.1f} minutes** on {s['device']} (1-minute load average sampled during the "
          f"run: mean {load.get('mean', float('nan')):.2f}, max {load.get('max', float('nan')):.2f}, on "
          f"{load.get('cpus', '?')} cores: other work shared the machine when the load exceeds 2).", ""]
    code = s.get("code") or {}
    if code:
        other = code.get("jobs_by_other_code") or {}
        L += [f"Made by {code['this_run']}" + (
            f"; **{len(other)} of its jobs were kept from a run of other code** ("
            + "; ".join(f"{k}: {v}" for k, v in sorted(other.items()))
            + "), so its numbers may differ from a fresh run (`--rerun-other-code` reruns them)." if other
            else ", every job of it."), ""]
    L += ["## Setup", "",
          f"* **Task** (`rlt/data/arithmetic.py`): {s['task']}. Splits are disjoint by a hash of the question "
          "(80/10/10 %). A raw trace adds one number per step but *folds* the next number into the same step with "
          "probability 0.35 per step boundary (`10 + 5 + 9 = 24`): always correct, but it skips work the reader "
          "must then do in its head, the way a strong model's traces skip steps that are obvious to it. A fully "
          "worked trace never folds.",
          f"* **Models**: {m.get('description', '?')}. Built locally (`rlt/testing/tiny_model.py`), random "
          "initialisation, shared local BPE tokenizer; no hub.",
          f"* **Students** (a) raw traces, (b) RL-teacher explanations, (c) warm-up-teacher explanations: each "
          f"trained from scratch for the same token budget ({preset.student_tokens:,} tokens, batch {preset.batch}, "
          f"learning rate {rs['student_lr']:g}, {rs['student_schedule']}) on the same {preset.n_train} training "
          f"questions, seeds {s['seeds']} (the "
          f"seed sets the initialisation and the data order). The seed-{s['seeds'][0]} raw student is also the "
          "frozen **reward student**.",
          f"* **Teacher**: same shape, SFT warm-up on the raw traces (question + solution -> explanation, same "
          f"token budget), then GRPO for {preset.rl_steps} steps of {preset.rl_prompts} prompts x "
          f"{preset.rl_generations} explanations (lr {preset.rl_lr}, temperature {rs['rl_temperature']:g}, KL to the "
          f"reference {rs['rl_beta']:g}), reward r_SS - r_KL with coefficients alpha {rs['alpha']} on [mean, min], "
          f"lambda {rs['lambda']} on [mean, max].",
          f"* **Distillation**: {preset.k} explanations per training question, the best by the teacher reward kept.",
          f"* **Evaluation**: greedy decoding on {preset.n_test} held-out test questions; the answer is the last "
          "`\\boxed{}` of the solution section (`rlt.eval`). 95% intervals are Student-t over the seeds.", ""]
    if (curves_dir / "curves.png").exists():
        L += ["## Why this task and this model size", "",
              "The learning-curve study (`python -m rlt.experiment curves`, validation split only) trained students "
              "of three shapes on raw and on fully worked traces:", "", "![learning curves](curves/curves.png)", ""]
        if (curves_dir / "curves.md").exists():
            L += [ln for ln in (curves_dir / "curves.md").read_text().splitlines() if ln.startswith("|")] + [""]
    vc_png = plot_val_curves({f"({'abc'[i]}) {VARIANTS[v]}": s["val_curves_seed0"].get(v, [])
                              for i, v in enumerate(VARIANTS)}, plots / "val_curves.png")
    if vc_png:
        L += [f"This run's seed-{s['seeds'][0]} students, validation accuracy along training (same token budget):",
              "", "![validation curves](plots/val_curves.png)", ""]
    tb = s.get("training_budgets") or {}
    if tb:
        L += ["Training budgets (non-padding tokens seen):", "", "| run | steps | tokens | examples |",
              "|---|---|---|---|"]
        L += [f"| {k} | {v['steps']} | {v['tokens']:,} | {v['examples']} |" for k, v in sorted(tb.items()) if v["tokens"]]
        L += [""]
    L += ["## Teacher RL", "",
          f"* reward over the first {s['reward_window']} steps: **{_pm(s['reward_first10_mean'], s['reward_first10_se'])}**"
          f" (mean ± standard error); over the last {s['reward_window']}: "
          f"**{_pm(s['reward_last10_mean'], s['reward_last10_se'])}**; rise z = **{s['reward_rise_z']:.2f}** "
          f"({s['rl_steps']} steps).", ""]
    if comp_png:
        L += ["![reward components](plots/reward_components.png)", ""]
    g = s.get("gold_trace_rewards")
    if g:
        L += ["Before any RL, the reward (warm-up teacher's log-probs, the reward student) of the same validation "
              "questions' gold traces written two ways:", "",
              "| gold traces | reward | r_SS | r_KL | traces that fold |", "|---|---|---|---|---|"]
        for k in ("raw", "full"):
            L.append(f"| {k} | {_pm(g[k]['reward']['mean'], g[k]['reward']['se'])} | {g[k]['r_ss']['mean']:.3f} | "
                     f"{g[k]['r_kl']['mean']:.3f} | {g[k]['folded_frac']:.2f} |")
        L += ["", f"Paired difference (fully worked - raw): "
                  f"{_pm(g['full_minus_raw']['mean'], g['full_minus_raw']['se'])}.", ""]
    L += ["## Explanations", "",
          "| source | n | fold steps | with a wrong step | unparsed | cut off (no end tag) | mean reward |",
          "|---|---|---|---|---|---|---|"]
    sel, allk = s["explanations_selected"], s["explanations_all_k"]
    L.append(f"| raw traces (training data) | {sel['raw']['n']} | {sel['raw']['folded_frac']:.2f} | 0.00 | 0.00 | "
             "0.00 | |")
    for v, name in (("warmup", "warm-up teacher"), ("rlt", "RL teacher")):
        a, b = allk.get(v, {}), sel.get(v, {})
        if a.get("n"):
            L.append(f"| {name}, all {preset.k} samples | {a['n']} | {a['folded_frac']:.2f} | {a['wrong_frac']:.2f} | "
                     f"{a['unparsed_frac']:.2f} | {a['no_end_tag_frac']:.2f} | {a.get('reward', float('nan')):.3f} |")
        if b.get("n"):
            cut = "" if b.get("no_end_tag_frac") is None else f"{b['no_end_tag_frac']:.2f}"  # rows from before end_tag
            L.append(f"| {name}, best of {preset.k} (distilled) | {b['n']} | {b['folded_frac']:.2f} | "
                     f"{b['wrong_frac']:.2f} | {b['unparsed_frac']:.2f} | {cut} | {b.get('reward') or float('nan'):.3f} |")
    L += ["", f"*Cut off*: explanations without the end tag (cut at the {preset.max_tokens}-token budget); "
          "distillation keeps them with the reward's penalty, so when none of a question's explanations ends, a "
          "cut-off one becomes student data.",
          "", "Distilled explanations (best of k) of the first training questions, warm-up teacher vs. RL teacher:", ""]
    for v, name in (("warmup", "warm-up teacher"), ("rlt", "RL teacher")):
        for r in _best_per_question(_jsonl(out / "distill" / f"{v}.explanations.jsonl"), 3):
            pen = f" + penalty {r['match_penalty']:.0f}" if r.get("match_penalty") else ""
            L += [f"*{name}*, {r['question']} (reward {r['reward']:.3f} = r_SS {r['r_ss']:.3f} - r_KL "
                  f"{r['r_kl']:.3f}{pen}):", "", "```", r["completion"].strip(), "```", ""]
    L += ["## Students (held-out test split)", "", "![accuracy](plots/accuracy.png)", "",
          "| students trained on | accuracy (mean ± 95% CI) | per seed | no answer | thoughts that fold steps | "
          "with a wrong step |",
          "|---|---|---|---|---|---|"]
    for i, v in enumerate(VARIANTS):
        shp = [x for x in s["student_outputs"][v] if x]
        fold = stats.mean([x["folded_frac"] for x in shp]) if shp else float("nan")
        wrong = stats.mean([x["with_wrong_step_frac"] for x in shp]) if shp else float("nan")
        na = [x for x in s.get("no_answer_per_seed", {}).get(v, []) if x is not None]
        L.append(f"| ({'abc'[i]}) {VARIANTS[v]} | **{_acc(s['acc_' + v])}** | "
                 f"{', '.join(f'{x:.3f}' for x in s['acc_per_seed'][v])} | "
                 f"{stats.mean(na) if na else float('nan'):.3f} | {fold:.2f} | {wrong:.2f} |")
    L += ["", "*No answer*: the share of outputs without a final answer (cut at the evaluation's token budget, or "
          "never boxed), mean over seeds."]
    L += ["", "Paired by seed (same initialisation and data order):", ""]
    for k, v in s["acc_paired_differences"].items():
        L.append(f"* {k.replace('_minus_', ' - ')}: {_acc(v)}")
    rg = s["reward_gain_correlation"]
    L += ["", "## Reward vs. student gain", "",
          f"Per test question, the RL teacher's mean reward over its {preset.k} explanations against the gain of the "
          f"RLT students over the raw students on that question (mean over seeds): Pearson r = "
          f"**{rg['pearson_r']:.3f}** (95% CI {rg['pearson_ci95'][0]:.3f} to {rg['pearson_ci95'][1]:.3f}), Spearman "
          f"rho = {rg['spearman_rho']:.3f}, {rg['questions']} questions. (The teacher sees these test solutions "
          "only to compute this statistic; nothing is trained or selected on them. The reward is scored by the seed-0 raw "
          "student, which is also one of the raw students the gain is taken over: questions it already finds easy "
          "score high and leave less room for a gain, which pulls r down.)", ""]
    if rg_png:
        L += ["![reward vs gain](plots/reward_gain.png)", ""]
    L += ["## Verdict", ""] + verdict(s) + [""]
    L += ["## Files", "", "* `summary.json`: every number above; `logs/`: one log per stage; `models/teacher_rl/"
          "trainer_state.json`: the RL log history; `distill/*.jsonl`: distilled data, `*.explanations.jsonl`: every "
          "sampled explanation with its reward components; `eval/*/results.jsonl`: per-question answers.", ""]
    path = out / "report.md"
    path.write_text("\n".join(L))
    return path


def _excludes_zero(a: dict) -> int | str:
    """+1 / -1 when the 95% interval lies above / below zero, 0 when it contains zero; "nan" without a value or
    an interval, "flat" when the seeds agree exactly (no spread, so no interval to judge by)."""
    if a["mean"] != a["mean"] or a["ci95"] != a["ci95"]:
        return "nan"
    if a["ci95"] <= 1e-9 * max(1.0, abs(a["mean"])):   # rounding, not spread: e.g. 0.8-0.7 vs 0.9-0.8
        return "flat"
    if a["mean"] - a["ci95"] > 0:
        return 1
    if a["mean"] + a["ci95"] < 0:
        return -1
    return 0


def verdict(s: dict) -> list[str]:
    """Plain statements that follow from the numbers (no claim the intervals do not support)."""
    out = []
    z, crit, df = s["reward_rise_z"], s.get("reward_rise_crit"), s.get("reward_rise_df")
    if z is None or z != z or crit is None or crit != crit:
        out.append("* The RL stage's effect on the teacher reward is undetermined (no spread in a window, or too "
                   "few logged steps).")
    else:
        bound = f"Welch's t, {df:.1f} degrees of freedom: 95% bound {crit:.2f}"
        if z > crit:
            out.append(f"* The RL stage raised the teacher reward (z = {z:.2f}; {bound}).")
        elif z < -crit:
            out.append(f"* The RL stage lowered the teacher reward (z = {z:.2f}; {bound}).")
        else:
            out.append(f"* The RL stage did not clearly change the teacher reward (z = {z:.2f}, within ±{crit:.2f}: "
                       f"noise; {bound}).")
    d = s["acc_paired_differences"]
    for key, what in (("rlt_minus_raw", "RLT explanations vs. the raw traces"),
                      ("rlt_minus_warmup", "RLT explanations vs. the warm-up teacher's (the RL stage's own effect)"),
                      ("warmup_minus_raw", "warm-up-teacher explanations vs. the raw traces (best-of-k selection "
                                           "alone)")):
        sign = _excludes_zero(d[key])
        word = {1: "better", -1: "worse", 0: "not distinguishable (the 95% interval contains 0)",
                "nan": "undetermined (a value is missing)",
                "flat": "undetermined (every seed gave the same difference, so there is no interval)"}[sign]
        out.append(f"* Students on {what}: {word}; difference {_acc(d[key])}.")
    out.append("* The accuracy intervals are over the seeds (t, seeds - 1 degrees of freedom) on these test "
               "questions: they leave out the noise of which questions were drawn.")
    return out

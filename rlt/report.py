"""Summary of a demo run: the table printed at the end of scripts/demo.sh and report.md.

    python -m rlt.report DEMO_DIR [--seconds N]

Reads the runs scripts/demo.sh writes under DEMO_DIR: student_raw (the reward student and the baseline),
pre_rl_model, rlt_teacher, distilled.jsonl, student_rlt, eval_student_rlt, eval_student_raw.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlt.cli import read_json, user_errors
from rlt.errors import ConfigError
from rlt.stats import rise_z

RUNS = [  # (directory, what it is)
    ("student_raw", "student SFT on the raw traces: the frozen reward student of the RL stage and the baseline"),
    ("pre_rl_model", "teacher SFT warm-up on the same raw traces (question + solution -> explanation)"),
    ("rlt_teacher", "teacher RL (GRPO) from the warm-up, rewarded by the trained student"),
    ("student_rlt", "student SFT on the RL teacher's distilled explanations"),
]


def _json(path: Path) -> dict:
    return read_json(path, {})


def reward_windows(rewards: list[float], window: int = 5) -> str:
    """'first W steps m ± se, last W steps m ± se (z = ...)' over the logged rewards."""
    if len(rewards) < 2:
        return "fewer than 2 logged steps"
    w = max(1, min(window, len(rewards) // 2))
    r = rise_z(rewards[:w], rewards[-w:])
    return (f"first {w} steps {r['first_mean']:.4f} ± {r['first_se']:.4f}, last {w} steps {r['last_mean']:.4f} ± "
            f"{r['last_se']:.4f} (mean ± standard error; z of the change {r['z']:.2f})")


def describe_model(run: Path) -> str:
    """'Qwen2, L layers, hidden H, P parameters; S steps on DATA' from a run directory."""
    cfg = _json(run / "config.json")
    if not cfg:
        return "not found"
    h, n_layers, vocab, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    params = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + n_layers * (4 * h * h + 3 * h * inter)
    text = f"Qwen2 ({n_layers} layers, hidden {h}, ~{params / 1e6:.2f}M parameters)"
    state = _json(run / "trainer_state.json")
    composed = run / "rlt_config.yaml"
    if composed.exists():
        from omegaconf import OmegaConf

        c = OmegaConf.load(composed)
        steps = state.get("global_step", c.get("max_steps"))
        text += (f", {steps} steps of {c.get('train_batch_size')} examples on {c.get('dataset_id_or_path')}, "
                 f"from {c.get('model_name_or_path')}")
    return text


def build_report(d: Path, seconds: int | None = None) -> str:
    from rlt.plot import load_history

    hist = load_history(d / "rlt_teacher") if (d / "rlt_teacher").exists() else []
    rewards = [h["reward"] for h in hist if "reward" in h]
    comps = {k: [h[k] for h in hist if k in h] for k in ("teacher_reward/r_ss", "teacher_reward/r_kl",
                                                           "teacher_reward/no_end_tag_frac")}
    distill = _json(d / "distilled.summary.json")
    rows = [("(RLT) student SFT on the RL teacher's explanations", _json(d / "eval_student_rlt" / "summary.json")),
            ("(baseline) student SFT on the raw traces", _json(d / "eval_student_raw" / "summary.json"))]
    lines = ["# RLT demo report", "",
             "A shortened pipeline on CPU: tiny Qwen2 models built locally (no hub; random initialisation, a BPE "
             "tokenizer trained on the task's text) and the embedded running-sum task (`rlt-arith`, "
             "rlt/data/arithmetic.py). Every stage runs with the real launchers; training lasts minutes, so the "
             "accuracies show that the pipeline works, not RLT's gains (scripts/experiment.sh measures those).", ""]
    if seconds is not None:
        lines += [f"Pipeline wall time: {seconds} s ({seconds / 60:.1f} min).", ""]
    lines += ["## Models", ""]
    for name, what in RUNS:
        lines.append(f"- `{name}`: {what}. {describe_model(d / name)}")
    lines += ["", "## Teacher RL", ""]
    if rewards:
        lines.append(f"- {len(rewards)} steps; reward {reward_windows(rewards)}")
        for k, v in comps.items():
            if v:
                lines.append(f"- {k.split('/', 1)[1]}: {reward_windows(v)}")
    else:
        lines.append("- no reward logged")
    lines += ["- curves: plots/training_curves.png", "",
              "## Distillation", "",
              f"- explanations generated: {distill.get('explanations', '?')}, without end tag: "
              f"{distill.get('no_end_tag', '?')}, with the student's tags in the thought (dropped): "
              f"{distill.get('tags_in_thought', '?')}, rows written: {distill.get('rows', '?')} "
              f"(select={distill.get('select', '?')})", "",
              "## Evaluation (held-out questions)", "",
              "| student | questions | accuracy | any correct | no answer |", "|---|---|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {s.get('questions', '?')} | {s.get('accuracy', float('nan')):.3f} | "
                     f"{s.get('any_correct', float('nan')):.3f} | {s.get('no_answer', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("demo_dir")
    ap.add_argument("--seconds", type=int, default=None)
    args = ap.parse_args(argv)
    d = Path(args.demo_dir)
    with user_errors("rlt.report"):
        if not any((d / name).is_dir() for name, _ in RUNS):
            raise ConfigError(f"{d}: none of the demo's runs ({', '.join(n for n, _ in RUNS)}) is there; give the "
                              "directory scripts/demo.sh wrote")
        text = build_report(d, args.seconds)
    (d / "report.md").write_text(text)
    print(text)  # noqa: print  (the demo's summary, for the user)
    print(f"report: {d / 'report.md'}")  # noqa: print


if __name__ == "__main__":
    main()

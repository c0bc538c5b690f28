"""Training curves of a run: for RL the reward, each reward component, KL to the reference and
completion length; for SFT (and RL) the loss, learning rate and gradient norm.

    python -m rlt.plot RUN_DIR [--out RUN_DIR/plots]

Reads the log history in RUN_DIR/trainer_state.json (or the newest
checkpoint's) and writes one PNG with a labelled panel per metric
(training_curves.png) plus the values as CSV (training_curves.csv).
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path

from rlt.cli import user_errors
from rlt.errors import ConfigError

logger = logging.getLogger("rlt.plot")
METRICS = [("reward", "total reward"), ("teacher_reward/r_ss", "r_SS (solution log-prob term)"),
           ("teacher_reward/r_kl", "r_KL (KL penalty term)"), ("teacher_reward/match_penalty", "match penalty"),
           ("teacher_reward/thought_kl/mean", "mean thought KL (teacher - student)"),
           ("teacher_reward/solution_log_prob/mean", "mean solution log-prob (student)"),
           ("kl", "KL to reference"), ("completions/mean_length", "completion length (tokens)"),
           ("loss", "training loss"), ("learning_rate", "learning rate"), ("grad_norm", "gradient norm")]


def load_history(run_dir: Path) -> list[dict]:
    """The logged steps of a run (trainer_state.json in the run directory, else its newest complete
    checkpoint's, resumable or not); a ConfigError naming the directory when there is neither."""
    from transformers import TrainerState

    from rlt.runs import complete_checkpoints

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such directory")
    state = run_dir / "trainer_state.json"
    if not state.exists():
        ckpt = (complete_checkpoints(str(run_dir)) or [None])[-1]
        if ckpt is None:
            raise ConfigError(f"{run_dir}: no trainer_state.json and no complete checkpoint-N directory: not a "
                              "training run's output_dir")
        state = Path(ckpt) / "trainer_state.json"
    return [h for h in TrainerState.load_from_json(str(state)).log_history if "step" in h]


def plot(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir or run_dir / "plots")
    hist = load_history(run_dir)
    present = [(k, label) for k, label in METRICS if any(k in h for h in hist)]
    if not present:
        raise ConfigError(f"{run_dir}: the log history has none of {[k for k, _ in METRICS]}")
    out.mkdir(parents=True, exist_ok=True)
    cols = 2
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, present):
        pts = [(h["step"], h[key]) for h in hist if key in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle(f"training curves: {run_dir.name}")
    fig.tight_layout()
    png = out / "training_curves.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    with open(out / "training_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [k for k, _ in present])
        for h in hist:
            if any(k in h for k, _ in present):
                w.writerow([h["step"]] + [h.get(k, "") for k, _ in present])
    logger.info("wrote %s", png)
    return png


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors("rlt.plot"):
        plot(args.run_dir, args.out)


if __name__ == "__main__":
    main()

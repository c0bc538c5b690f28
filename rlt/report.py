"""Summary of a demo run: the table printed at the end of scripts/demo.sh and report.md.

    python -m rlt.report DEMO_DIR [--seconds N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def build_report(d: Path, seconds: int | None = None) -> str:
    from rlt.plot import load_history

    hist = load_history(d / "rlt_teacher")
    rewards = [h["reward"] for h in hist if "reward" in h]
    distill = _json(d / "distilled.summary.json")
    rows = [("student SFT on RLT-distilled traces", _json(d / "eval_student_rlt" / "summary.json")),
            ("student SFT on the original traces (baseline)", _json(d / "eval_student_base" / "summary.json"))]
    lines = ["# RLT demo report", "",
             "Tiny random Qwen2 models (2 layers, hidden 128) on embedded Countdown data, CPU only. The numbers "
             "show that every stage runs end to end; models this small do not learn Countdown.", ""]
    if seconds is not None:
        lines += [f"Pipeline wall time: {seconds} s.", ""]
    lines += ["## Teacher RL", "",
              f"- steps: {len(rewards)}; reward first step {rewards[0]:.4f}, last step {rewards[-1]:.4f}"
              if rewards else "- no reward logged", "- curves: plots/training_curves.png", "",
              "## Distillation", "",
              f"- explanations generated: {distill.get('explanations', '?')}, without end tag: "
              f"{distill.get('no_end_tag', '?')}, rows written: {distill.get('rows', '?')} "
              f"(select={distill.get('select', '?')})", "",
              "## Evaluation (held-out Countdown)", "",
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
    text = build_report(d, args.seconds)
    (d / "report.md").write_text(text)
    print(text)  # noqa: print  (the demo's summary, for the user)
    print(f"report: {d / 'report.md'}")  # noqa: print


if __name__ == "__main__":
    main()

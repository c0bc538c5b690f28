"""Benchmark the teacher reward against the per-sample oracle and the forward-pass floor.

    .venv/bin/python scripts/bench_reward.py [--out results/bench_reward.json] [--quick]

Models: Qwen2-shaped, vocab 151936 (as Qwen2.5), hidden 256, 2 layers; teacher
and student with different seeds; float32 on CPU. Cases: 16 completions of
1-2k tokens ("main") and 4 of ~4k tokens ("long"). For each case, in one run:
  (a) rlt's batched reward,
  (b) the oracle (tests/reward_oracle.py: one sample at a time, full-vocab
      float32 log_softmax, as the reference implementation does),
  (c) the floor: the bare forward passes of both models on rlt's micro-batches
      with the output layer applied only at the scored positions (in rlt's
      row/vocabulary blocks), no softmax.
Each measurement runs in its own subprocess; extra peak memory is the peak RSS
during the measurement minus the RSS after the models were loaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
logger = logging.getLogger("bench_reward")
CASES = {"main": dict(n=16, lo=1000, hi=2000), "long": dict(n=4, lo=3800, hi=4200)}
QUICK = {"main": dict(n=4, lo=300, hi=500), "long": dict(n=2, lo=900, hi=1100)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every 2 ms in a thread; .peak is the maximum seen."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def setup(case: dict):
    from rlt.data import countdown
    from rlt.data.formats import resolve_format
    from rlt.data.text import teacher_prompt
    from rlt.models import load_tokenizer
    from rlt.rewards.teacher_reward import RewardInput
    from rlt.testing.tiny_model import build_model

    tok = load_tokenizer("rlt-tiny:0")
    fmt = resolve_format("bespoke_stratos")
    kw = dict(vocab_size=151936, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512,
              max_position_embeddings=8192)
    teacher, student = build_model(tok, seed=0, **kw).eval(), build_model(tok, seed=1, **kw).eval()
    rows = countdown.generate_rows(400, seed=11)
    items, k = [], 0
    for i in range(case["n"]):
        target = case["lo"] + (case["hi"] - case["lo"]) * i // max(1, case["n"] - 1)
        text = ""
        while len(tok(text, add_special_tokens=False)["input_ids"]) < target:
            text += rows[k % len(rows)]["reasoning_trace"]
            k += 1
        r = rows[i]
        comp = text.lstrip("\n") + "<|end_of_explanation|>"
        items.append(RewardInput(teacher_prompt(tok, r["question"], r["solution"], fmt), comp, r["question"], r["solution"]))
    return tok, fmt, teacher, student, items


def worker(case_name: str, mode: str, quick: bool) -> dict:
    from reward_oracle import oracle_reward
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.logprobs import _body, length_grouped_batches
    from rlt.rewards.teacher_reward import TeacherReward

    torch.set_num_threads(os.cpu_count() or 1)
    tok, fmt, teacher, student, items = setup((QUICK if quick else CASES)[case_name])
    cfg = RewardConfig()
    reward = TeacherReward(student, tok, fmt, cfg, teacher_temperature=0.7)
    base = rss_bytes()
    out = {"case": case_name, "mode": mode, "n": len(items)}
    with torch.no_grad(), PeakRSS() as mem:
        t0 = time.perf_counter()
        if mode == "rlt":
            res = reward(teacher, items)
            out["rewards"] = res.rewards.tolist()
        elif mode == "oracle":
            out["rewards"] = [oracle_reward(teacher, student, tok, fmt, cfg, 0.7, it)["reward"] for it in items]
        else:  # floor
            preps = [reward.prepare(it) for it in items]
            t0 = time.perf_counter()  # text preparation is not part of the floor
            for model, seqs, pos in ((student, [p.student_ids for p in preps],
                                      [p.solution_pos + p.thought_pos_student for p in preps]),
                                     (teacher, [p.teacher_ids for p in preps], [p.thought_pos_teacher for p in preps])):
                for batch in length_grouped_batches([len(s) for s in seqs], cfg.reward_micro_batch_size):
                    width = max(len(seqs[i]) for i in batch)
                    ids = torch.zeros(len(batch), width, dtype=torch.long)
                    attn = torch.zeros_like(ids)
                    for r, i in enumerate(batch):
                        ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                        attn[r, :len(seqs[i])] = 1
                    h = _body(model)(input_ids=ids, attention_mask=attn).last_hidden_state
                    rows = torch.tensor([r for r, i in enumerate(batch) for _ in pos[i]])
                    cols = torch.tensor([p - 1 for i in batch for p in pos[i]])
                    picked = h[rows, cols]
                    w = model.get_output_embeddings().weight
                    rc, vc = cfg.reward_logit_chunk_size, cfg.reward_vocab_chunk_size
                    for s in range(0, picked.shape[0], rc):  # the same blocks as rlt, without any softmax
                        for v in range(0, w.shape[0], vc):
                            F.linear(picked[s:s + rc], w[v:v + vc])
        out["seconds"] = time.perf_counter() - t0
    out["peak_extra_gb"] = (mem.peak - base) / 2**30
    out["tokens"] = sum(len(p.student_ids) + len(p.teacher_ids) for p in map(reward.prepare, items))
    return out


def run_worker(case: str, mode: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, mode] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {case}/{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_reward.json"))
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.quick)))  # noqa: print  (parsed by the parent)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = {}
    for case in CASES:
        r = {m: run_worker(case, m, args.quick) for m in ("rlt", "oracle", "floor")}
        diff = max(abs(a - b) for a, b in zip(r["rlt"]["rewards"], r["oracle"]["rewards"]))
        summary[case] = {
            "completions": r["rlt"]["n"], "scored_sequence_tokens": r["rlt"]["tokens"],
            "seconds_rlt": r["rlt"]["seconds"], "seconds_oracle": r["oracle"]["seconds"],
            "seconds_floor": r["floor"]["seconds"],
            "speedup_vs_oracle": r["oracle"]["seconds"] / r["rlt"]["seconds"],
            "floor_ratio": r["rlt"]["seconds"] / r["floor"]["seconds"],
            "max_abs_diff": diff,
            "peak_extra_gb_rlt": r["rlt"]["peak_extra_gb"], "peak_extra_gb_oracle": r["oracle"]["peak_extra_gb"],
            "peak_extra_gb_floor": r["floor"]["peak_extra_gb"],
        }
        s = summary[case]
        logger.info("%-5s %2d completions: rlt %.1fs  oracle %.1fs  floor %.1fs | speed-up %.2fx  floor ratio %.2f  "
                    "max|diff| %.2e | extra peak GB rlt %.2f oracle %.2f floor %.2f", case, s["completions"],
                    s["seconds_rlt"], s["seconds_oracle"], s["seconds_floor"], s["speedup_vs_oracle"],
                    s["floor_ratio"], s["max_abs_diff"], s["peak_extra_gb_rlt"], s["peak_extra_gb_oracle"],
                    s["peak_extra_gb_floor"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""Benchmark the reward's output-layer backends alone: hidden states [N, H] -> log p(label) [N].

    .venv/bin/python scripts/bench_output_layer.py [--device cpu|cuda] [--shape bench|0.5b|7b]
        [--dtype float32|bfloat16] [--vocab V] [--hidden H] [--rows 4096,32768] [--backends online,rowchunk,fused]
        [--fused-tiles sweep|128x64w8s3,...] [--out FILE]

The output layer has the vocabulary and hidden size of ``--shape`` (or ``--vocab`` / ``--hidden``; random
weights, std 0.02; hidden states N(0, 1)); labels are random. For each N and backend
(rlt.rewards.logprobs.output_logprobs, temperature 0.7): median seconds of 3 timed calls after one warm-up (which
compiles the Triton kernel), extra peak memory of a call, and max |lp - reference| over the first 1024 rows, the
reference being float64 products of the same (dtype-rounded) values. ``bare`` is the output-layer GEMM alone in
the model's dtype, in the rowchunk backend's row blocks, results discarded: the floor of any backend that
multiplies in the model's dtype. The fused backend needs CUDA (or TRITON_INTERPRET=1); elsewhere it is left out
with a line saying so. ``--fused-tiles`` times the fused kernel again with other launch configurations
(rlt.rewards.fused_logprobs.Tiles; ``sweep``: its SWEEP list), under ``fused_tiles`` per row count, and names
the fastest (``best_fused_tiles``); a configuration the card cannot hold (out of shared memory or registers) is
recorded with its error. Exit 1 when a backend's max |diff| is above --tolerance.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("bench_output_layer")
TEMPERATURE = 0.7
CHECK_ROWS = 1024


def timed(fn, device: torch.device, reps: int = 3) -> tuple[object, float, float]:
    """(result, median seconds of ``reps`` calls after a warm-up, extra peak GB of one call; CUDA only, else 0)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    secs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync()
        secs.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else 0.0
    return out, statistics.median(secs), peak


def reference(h: torch.Tensor, lab: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
    """float64 log_softmax(h W^T / t)[label] of the first CHECK_ROWS rows, 128 rows at a time (``w64``: the
    weight in float64)."""
    out = []
    for s in range(0, min(len(h), CHECK_ROWS), 128):
        z = (h[s:s + 128].double() @ w64.t()) / TEMPERATURE
        out.append(torch.log_softmax(z, -1).gather(1, lab[s:s + 128, None]).squeeze(1))
    return torch.cat(out)


def bare(h: torch.Tensor, w: torch.Tensor, rows: int) -> None:
    for s in range(0, h.shape[0], rows):
        F.linear(h[s:s + rows], w)


def measure(label: str, fn, want: torch.Tensor, bare_seconds: float, device: torch.device) -> dict:
    """Time ``fn`` (-> log-probs [N]) and compare its first rows with ``want``; logged and returned."""
    lp, secs, peak = timed(fn, device)
    err = (lp[:len(want)].double() - want).abs().max().item()
    logger.info("%s: %.4f s (%.2fx bare), peak +%.3f GB, max |diff| %.2e", label, secs, secs / bare_seconds, peak, err)
    return {"seconds": round(secs, 5), "peak_extra_gb": round(peak, 3), "max_abs_diff": err,
            "over_bare": round(secs / bare_seconds, 3)}


def fused_tiles(text: str) -> list:
    """--fused-tiles: 'sweep' or comma-separated VxKwW[sS] -> [Tiles]; one line naming the bad item."""
    from rlt.rewards.fused_logprobs import SWEEP, Tiles   # imports triton

    if text == "sweep":
        return list(SWEEP)
    try:
        return [Tiles.parse(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        sys.exit(f"bench_output_layer: --fused-tiles: {e}")


def main() -> None:
    from rlt.errors import ConfigError
    from rlt.rewards import logprobs as L
    from rlt.rewards.config import LOGPROB_BACKENDS, RewardConfig
    from rlt.testing.tiny_model import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shape", choices=("bench", "0.5b", "7b"), default="bench", help="bench: vocab 151936, hidden 256")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--vocab", type=int, help="vocabulary size instead of the shape's")
    ap.add_argument("--hidden", type=int, help="hidden size instead of the shape's")
    ap.add_argument("--rows", default="2048", help="comma-separated numbers of scored positions")
    ap.add_argument("--backends", default="online,rowchunk,fused", help="comma-separated, from online/rowchunk/fused")
    ap.add_argument("--fused-tiles", default="",
                    help="comma-separated fused launch configurations VxKwW[sS] to time as well, or 'sweep'")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_output_layer.json"))
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="exit 1 when a backend's max |diff| from the float64 reference is above this")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_output_layer: --device cuda but torch sees no CUDA device")
    backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in backends if b == "auto" or b not in LOGPROB_BACKENDS]
    rows = [int(n) for n in args.rows.split(",") if n]
    if any(x is not None and x < 1 for x in (args.vocab, args.hidden)):
        sys.exit(f"bench_output_layer: --vocab {args.vocab} / --hidden {args.hidden}: positive sizes")
    if bad or not rows or min(rows) < 1:
        sys.exit(f"bench_output_layer: --backends {args.backends!r} / --rows {args.rows!r}: backends from "
                 "online,rowchunk,fused and positive row counts")
    tiles = fused_tiles(args.fused_tiles) if args.fused_tiles else []
    fused_refused = ""
    if "fused" in backends or tiles:
        try:
            L.resolve_backend("fused", device)
        except ConfigError as e:
            fused_refused = str(e)
            logger.info("fused left out: %s", fused_refused)
            backends, tiles = [b for b in backends if b != "fused"], []
    if tiles:
        from triton.runtime.errors import OutOfResources

        from rlt.rewards.fused_logprobs import fused_logprobs
    vocab, hidden = (151936, 256) if args.shape == "bench" else (SHAPES[args.shape]["vocab_size"],
                                                                 SHAPES[args.shape]["hidden_size"])
    vocab, hidden = args.vocab or vocab, args.hidden or hidden
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(vocab, hidden, generator=g, device=device) * 0.02).to(dtype)
    w64 = w.double()
    bare_rows = L.rowchunk_rows(vocab, RewardConfig.reward_logit_chunk_size)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "shape": args.shape,
              "vocab": vocab, "hidden": hidden, "dtype": args.dtype, "temperature": TEMPERATURE,
              "left_out": {"fused": fused_refused} if fused_refused else {}, "rows": {}}
    for n in rows:
        h = torch.randn(n, hidden, generator=g, device=device).to(dtype)
        lab = torch.randint(0, vocab, (n,), generator=g, device=device)
        want = reference(h, lab, w64)
        _, secs, peak = timed(lambda: bare(h, w, bare_rows), device)
        here = {"bare": {"seconds": round(secs, 5), "peak_extra_gb": round(peak, 3)}}
        logger.info("N=%d bare GEMM: %.4f s", n, secs)
        for b in backends:
            here[b] = measure(f"N={n} {b}", lambda: L.output_logprobs(h, lab, w, None, TEMPERATURE, b), want,
                              here["bare"]["seconds"], device)
        if tiles:
            here["fused_tiles"] = {}
        for t in tiles:
            try:
                here["fused_tiles"][t.name] = measure(
                    f"N={n} fused {t.name}", lambda: fused_logprobs(h, lab, w, None, TEMPERATURE, tiles=t), want,
                    here["bare"]["seconds"], device)
            except OutOfResources as e:   # a configuration this card cannot hold (shared memory, registers)
                here["fused_tiles"][t.name] = {"error": str(e).splitlines()[0][:300]}
                logger.info("N=%d fused %s: cannot run here: %s", n, t.name, here["fused_tiles"][t.name]["error"])
        ran = {k: v["seconds"] for k, v in here.get("fused_tiles", {}).items() if "seconds" in v}
        if ran:
            here["best_fused_tiles"] = min(ran, key=ran.get)
            logger.info("N=%d fastest fused tiles: %s", n, here["best_fused_tiles"])
        result["rows"][str(n)] = here
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        part = Path(args.out + ".part")   # replaced whole: a run killed mid-write leaves the last complete file
        part.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(part, args.out)
    logger.info("wrote %s", args.out)
    entries = [v for r in result["rows"].values() for v in [*r.values(), *r.get("fused_tiles", {}).values()]]
    worst = max((v["max_abs_diff"] for v in entries if "max_abs_diff" in v), default=0.0)
    if worst > args.tolerance:
        sys.exit(f"bench_output_layer: max |diff| {worst:.2e} above --tolerance {args.tolerance:g}")


if __name__ == "__main__":
    main()

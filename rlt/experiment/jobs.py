"""Running the experiment's stages as jobs on a small pool of worker processes.

On a 2-core CPU two single-threaded processes get far more done than one process with two threads (tiny
models are bound by per-op overhead, and a thread that loses its core stalls the other at every barrier),
so independent stages (a student of one seed while the teacher trains, two students at once, ...) run side
by side. Each worker imports torch/transformers/trl once and runs many jobs; each job writes everything it
prints into its own log file and reports its result (a JSON-able dict) back.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

logger = logging.getLogger("rlt.experiment")


@dataclasses.dataclass
class Job:
    name: str
    fn: str                       # a function of rlt.experiment.stages, or "module:function"
    kwargs: dict
    log: str                      # the job's log file
    deps: tuple[str, ...] = ()    # jobs that must finish first
    title: str = ""               # what the console line says


class JobFailed(RuntimeError):
    pass


def _init_worker(threads: int, parent: int) -> None:
    from rlt.procs import set_parent_death_signal

    set_parent_death_signal(parent)  # a worker never outlives the run (even after a SIGKILL of it)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)
    from rlt.experiment.runner import setup_experiment_logging

    setup_experiment_logging()


def _run(fn: str, kwargs: dict, log: str) -> dict:
    import importlib

    from rlt.experiment.runner import StageLog

    module, _, name = fn.rpartition(":")
    t0 = time.perf_counter()
    with StageLog(Path(log)):
        try:
            out = getattr(importlib.import_module(module or "rlt.experiment.stages"), name)(**kwargs)
        except BaseException:
            logging.getLogger("rlt.experiment.jobs").error("job failed:\n%s", traceback.format_exc())
            raise
    return {**(out or {}), "job_seconds": time.perf_counter() - t0}


def fingerprint(job: Job) -> str:
    """A hash of what the job does (function and arguments): a finished job is reused only while it matches."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps([job.fn, job.kwargs], sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_version(package: Path | None = None) -> dict:
    """What made a job's result besides its arguments: ``{"code": hash, "commit": str | None}``.

    ``code`` hashes every ``.py`` file of the ``rlt`` package and every recipe (``.yaml``) under the checkout's
    ``cfgs/`` (path and bytes, so uncommitted edits count: the jobs name their recipes, not their contents) with
    the versions of the libraries that compute the numbers; ``commit`` is the git commit of the checkout
    (``+dirty`` when its rlt/ or cfgs/ has uncommitted changes), for people to read; None outside a git
    checkout."""
    import hashlib
    import importlib.metadata as md
    import subprocess

    package = Path(package or Path(__file__).resolve().parents[1])
    h = hashlib.sha1()
    for f in sorted(package.rglob("*.py")):
        h.update(f.relative_to(package).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    cfgs = package.parent / "cfgs"
    for f in sorted(cfgs.rglob("*.yaml")):
        h.update(b"cfgs/" + f.relative_to(cfgs).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    for lib in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            h.update(f"{lib}=={md.version(lib)}\0".encode())
        except md.PackageNotFoundError:
            h.update(f"{lib} absent\0".encode())
    commit = None
    try:
        git = ["git", "-C", str(package)]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(git + ["status", "--porcelain", "--", ".", "../cfgs"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            commit = head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"code": h.hexdigest()[:12], "commit": commit}


def version_words(v: dict) -> str:
    """A result's or :func:`code_version`'s code in words: "commit 3f056cd, code 1a2b3c4d5e6f"."""
    if not v.get("code"):
        return "code not recorded"
    return (f"commit {v['commit']}, " if v.get("commit") else "") + f"code {v['code']}"


def made_by_other_code(results: dict, code: str) -> dict[str, str]:
    """{job: :func:`version_words` of what made it} for the results not made by ``code``."""
    return {n: version_words(r) for n, r in results.items() if r.get("code") != code}


def reusable(jobs: list[Job], results: dict) -> dict:
    """The earlier results still valid: same fingerprint, and every dependency valid too."""
    fp = {j.name: fingerprint(j) for j in jobs}
    ok = {n: r for n, r in results.items() if n in fp and r.get("fingerprint") == fp[n]}
    changed = True
    while changed:
        changed = False
        for j in jobs:
            if j.name in ok and any(d not in ok for d in j.deps):
                del ok[j.name]
                changed = True
    return ok


def kept(jobs: list[Job], results: dict, version: dict, rerun_other_code: bool = False) -> dict:
    """The earlier ``results`` a run of ``jobs`` keeps (:func:`reusable`); those made by other code than
    ``version`` are named in a warning, or dropped with what depends on them when ``rerun_other_code``."""
    results = reusable(jobs, dict(results))
    other = made_by_other_code(results, version["code"])
    if other and rerun_other_code:
        results = reusable(jobs, {n: r for n, r in results.items() if n not in other})
        logger.info("rerunning %d finished job(s) made by other code than this run's (%s), and what depends on "
                    "them", len(other), version_words(version))
    elif other:
        made = sorted(set(other.values()))
        logger.warning("%d of the finished jobs kept were made by other code than this run's (%s): %s by %s; "
                       "their numbers may differ from a fresh run (--rerun-other-code reruns them)", len(other),
                       version_words(version), ", ".join(sorted(other)), "; ".join(made))
    return results


def run_jobs(jobs: list[Job], workers: int, threads: int, results: dict | None = None, on_done=None,
             version: dict | None = None, rerun_other_code: bool = False) -> dict[str, dict]:
    """Run ``jobs`` respecting their deps on ``workers`` processes; {name: result}. ``results``: results of an
    earlier run; those still valid are kept (:func:`kept`), the rest rerun. ``version`` (:func:`code_version`,
    computed when None) is stored in each new result. ``on_done(results)`` is called after every finished job
    (to save progress). A failing job stops the run with its log named: no job starts after it, and the jobs
    already running finish first, so their results are kept (a Ctrl-C stops them at once instead)."""
    version = version or code_version()
    given = results or {}
    results = kept(jobs, given, version, rerun_other_code)
    if on_done is not None and results != given:
        on_done(results)   # before any job starts: a job about to be rerun must not stay listed as done
    fps = {j.name: fingerprint(j) for j in jobs}
    pending = [j for j in jobs if j.name not in results]
    names = {j.name for j in jobs}
    for j in pending:
        missing = [d for d in j.deps if d not in names]
        if missing:
            raise ValueError(f"job {j.name}: unknown dependencies {missing}")
    if results:
        logger.info("%d of %d jobs already done (same settings); %d to run", len(results), len(jobs), len(pending))
    t_start = time.perf_counter()
    if not pending:
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads, os.getpid())) as pool:
        running, failed = {}, None
        while (pending and failed is None) or running:
            ready = [j for j in pending if all(d in results for d in j.deps)] if failed is None else []
            while ready and len(running) < workers:
                j = ready.pop(0)
                pending.remove(j)
                logger.info("start %s (log: %s)", j.title or j.name, j.log)
                running[pool.submit(_run, j.fn, j.kwargs, j.log)] = (j, time.perf_counter())
            if not running:
                raise ValueError(f"jobs {[j.name for j in pending]} can never start (circular dependencies)")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                j, t0 = running.pop(fut)
                try:
                    results[j.name] = {**fut.result(), "fingerprint": fps[j.name], **version}
                except Exception as e:
                    why = f"{j.title or j.name} failed ({type(e).__name__}: {e}); see {j.log}"
                    failed = failed or why
                    if running:
                        logger.error("%s; letting the %d running job(s) finish so that their results are kept "
                                     "(Ctrl-C stops them now)", why, len(running))
                    continue
                logger.info("done  %s in %.0fs (%.1f min into this run)", j.title or j.name, time.perf_counter() - t0,
                            (time.perf_counter() - t_start) / 60)
                if on_done is not None:
                    on_done(results)
    if failed:
        raise JobFailed(failed)
    return results

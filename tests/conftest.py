import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlt.procs import SHM, SHM_PREFIXES

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Tiny models are built into a per-session cache, never into ~/.cache.
    if "RLT_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["RLT_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlt-test-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


LEAKS: list[tuple[str, list[str]]] = []  # (test, shared-memory segments it left), reported at the end


def _segments() -> set[str]:
    return {p.name for p in SHM.glob("*") if p.name.startswith(SHM_PREFIXES)} if SHM.is_dir() else set()


@pytest.fixture(autouse=True)
def _shared_memory_left_behind(request):
    """Notes the /dev/shm segments (psm_*, sem.mp-*) a test created and nothing removed within 5 s; the run then
    fails (:func:`pytest_sessionfinish`)."""
    before = _segments()
    yield
    deadline = time.monotonic() + 5
    while (new := _segments() - before) and time.monotonic() < deadline:
        time.sleep(0.5)  # resource trackers unlink what their processes leaked when those have exited
    if new:
        LEAKS.append((request.node.nodeid, sorted(new)))


SURVIVING: list[tuple[str, list[str]]] = []  # the LEAKS still there when the run ends: they fail it


def pytest_sessionfinish(session, exitstatus):
    """A run that leaves shared memory behind fails (nothing rlt starts may outlive it, nor what it made): the
    segments a test left that still exist once every fixture is torn down, a garbage collection has run (a
    spawn-context lock lives until its object goes) and 10 s have passed."""
    if not LEAKS:
        return
    import gc

    gc.collect()
    deadline = time.monotonic() + 10
    while True:
        SURVIVING[:] = [(t, alive) for t, names in LEAKS if (alive := [n for n in names if (SHM / n).exists()])]
        if not SURVIVING or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if SURVIVING and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):   # runs after pytest_sessionfinish above
    for test, names in LEAKS:
        terminalreporter.write_line(f"shared memory left behind by {test}: {' '.join(names)}")
    if SURVIVING:
        terminalreporter.write_sep("=", "FAILED: shared memory still left behind at the end: "
                                   + "; ".join(f"{t}: {' '.join(n)}" for t, n in SURVIVING), red=True)
    elif LEAKS:
        terminalreporter.write_line("(all of it was removed by the end of the run)")


@pytest.fixture(scope="session")
def tiny_path():
    from rlt.models import resolve_model_path

    return resolve_model_path("rlt-tiny:0")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from rlt.models import load_tokenizer

    return load_tokenizer(tiny_path)


def run_cmd(args, timeout=900, env=None, check=True, cwd=ROOT):
    """Run a command (from the repo root unless ``cwd``); on failure show its output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-8000:]}")
    return proc


def free_port(n: int = 1) -> int:
    """A loopback port P with P .. P+n-1 all free now: a run with n servers, or a server and its NCCL group port
    (P + servers), takes consecutive ports."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n - 1 > 65535:
            continue
        socks = []
        try:
            for q in range(port, port + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", q))
            return port
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no {n} consecutive free loopback ports found")


@contextlib.contextmanager
def running_server(model: str, log_path: Path, **spec):
    """A tiny vLLM server on a free loopback port, healthy; yields its ServerSpec and stops it afterwards."""
    from rlt.generation.server import ServerProcess, ServerSpec, wait_until_healthy

    spec = ServerSpec(model=model, host="127.0.0.1", port=free_port(), seed=0, max_model_len=2048, dtype="float32",
                      log_path=log_path, **spec)
    server = ServerProcess(spec)
    try:
        wait_until_healthy([server], timeout=600)
        yield spec
    finally:
        server.stop()

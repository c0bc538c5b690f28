"""Rollout throughput: a vLLM server vs trl's in-process generation, same model and settings.

    .venv/bin/python scripts/bench_rollouts.py [--prompts 8] [--generations 8] [--max-tokens 256]
                                               [--model rlt-tiny:0] [--out results/bench_rollouts.json]

Both paths are the trainer's own: TeacherGRPOTrainer._generate_single_turn
without a server (trl's model.generate) and with one (VLLMServerPool). The
same RL prompts (Countdown), repeated num_generations times, temperature 0.7.
The server is started here and stopped at the end; its start-up time is not
counted. Prints tokens/s of each and the ratio.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_rollouts")


def timed(trainer, prompt_ids, repeats: int) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        completions, _ = trainer._generate_single_turn(prompt_ids, None, {}, trainer.num_generations)
        best = min(best, time.perf_counter() - t0)
        tokens = sum(map(len, completions))
    return best, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--model", default="rlt-tiny:0")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_rollouts.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from rlt.generation.client import VLLMServerPool
    from rlt.generation.server import ServerProcess, ServerSpec, wait_until_healthy
    from rlt.models import resolve_model_path
    from rlt.config import build_train_settings, compose
    from rlt.trainers.grpo_run import build_teacher_grpo_trainer

    torch.manual_seed(0)
    model = resolve_model_path(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    n = args.prompts * args.generations
    cfg = compose("tiny_teacher_rlt", [f"output_dir={work}", f"model_name_or_path={model}",
                                       f"num_generations={args.generations}", f"train_batch_size={n}",
                                       f"per_device_train_batch_size={n}", f"max_completion_length={args.max_tokens}",
                                       "logging_prob=0", "save_completions_probability=0"])
    trainer, tok = build_teacher_grpo_trainer(build_train_settings(cfg, num_processes=1))
    prompts = [trainer.train_dataset[i]["prompt"] for i in range(args.prompts)]
    prompt_ids = [ids for ids in tok(prompts, add_special_tokens=False)["input_ids"] for _ in range(args.generations)]

    trl_s, trl_tokens = timed(trainer, prompt_ids, args.repeats)
    logger.info("trl in-process: %d completions, %d tokens in %.2fs", n, trl_tokens, trl_s)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ServerSpec(model=model, host="127.0.0.1", port=port, seed=0, dtype=cfg["dtype"],
                      max_model_len=cfg["max_prompt_length"] + args.max_tokens, log_path=work / "server.log",
                      gpu="0" if torch.cuda.is_available() else None)
    server = ServerProcess(spec)
    try:
        wait_until_healthy([server], timeout=900)
        trainer.rollout_pool = VLLMServerPool("127.0.0.1", port)
        trainer.weight_sync = lambda t: None  # same weights: nothing to push
        timed(trainer, prompt_ids[:args.generations], 1)  # warm-up
        vllm_s, vllm_tokens = timed(trainer, prompt_ids, args.repeats)
    finally:
        server.stop()
    logger.info("vLLM server:    %d completions, %d tokens in %.2fs", n, vllm_tokens, vllm_s)
    result = {"device": "cuda" if torch.cuda.is_available() else "cpu", "model": args.model, "completions": n,
              "max_tokens": args.max_tokens, "trl_tokens_per_s": trl_tokens / trl_s,
              "vllm_tokens_per_s": vllm_tokens / vllm_s}
    result["speedup"] = result["vllm_tokens_per_s"] / result["trl_tokens_per_s"]
    logger.info("tokens/s: trl %.0f, vLLM server %.0f -> %.1fx", result["trl_tokens_per_s"],
                result["vllm_tokens_per_s"], result["speedup"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

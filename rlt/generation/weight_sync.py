"""Pushing the policy's weights to the vLLM servers after each optimizer step.

filesystem: every rank joins the (ZeRO-3) gather, the main process writes the
    full weights as safetensors to a per-run directory (on /dev/shm when it
    exists and has room, else under output_dir) and asks each server to reload
    them, then deletes the previous copy. Works on any device.
nccl: trl's VLLMClient broadcasts the weights over NCCL (CUDA only; the
    servers are started with --weight-transfer-config).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SYNC_MODES = ("auto", "nccl", "filesystem")


def resolve_sync_mode(mode: str) -> str:
    if mode not in SYNC_MODES:
        raise ValueError(f"vllm_weight_sync={mode!r}: choose from {SYNC_MODES}")
    if mode == "auto":
        return "nccl" if torch.cuda.is_available() else "filesystem"
    if mode == "nccl" and not torch.cuda.is_available():
        raise ValueError("vllm_weight_sync=nccl needs CUDA; use filesystem (or auto) on this machine")
    return mode


def shm_sync_dir(output_dir: str) -> Path:
    """The run's directory in /dev/shm, named after its output_dir (so the launcher can remove it after a crash)."""
    return Path("/dev/shm") / f"rlt-sync-{hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]}"


def sync_root(output_dir: str, model_bytes: int) -> Path:
    """/dev/shm/rlt-sync-<hash of output_dir> when /dev/shm has room for two copies, else <output_dir>/weight_sync."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2.2 * model_bytes:
        return shm_sync_dir(output_dir)
    return Path(output_dir) / "weight_sync"


class FilesystemWeightSync:
    def __init__(self, pool, output_dir: str):
        self.pool = pool
        self.output_dir = output_dir
        self.root: Path | None = None
        self.previous: Path | None = None

    def __call__(self, trainer) -> None:
        acc = trainer.accelerator
        state_dict = acc.get_state_dict(trainer.model_wrapped)  # collective under ZeRO-3
        if acc.is_main_process:
            model = acc.unwrap_model(trainer.model)
            if self.root is None:
                nbytes = sum(v.numel() * v.element_size() for v in state_dict.values())
                self.root = sync_root(self.output_dir, nbytes)
                logger.info("weight sync through %s", self.root)
            target = self.root / f"step-{trainer.state.global_step}"
            model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
            self.pool.reload_weights(str(target))
            if self.previous is not None and self.previous != target:
                shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = target
        acc.wait_for_everyone()

    def close(self) -> None:
        if self.root is not None and self.root.is_relative_to("/dev/shm"):
            shutil.rmtree(self.root, ignore_errors=True)


class NcclWeightSync:
    """trl's NCCL path, one communicator per server (group port vllm_group_port + i)."""

    def __init__(self, pool, group_port: int):
        self.pool = pool
        self.group_port = group_port
        self.clients = None

    def _connect(self, trainer):
        from trl.generation.vllm_client import VLLMClient

        self.clients = []
        for i, url in enumerate(self.pool.urls):
            client = VLLMClient(base_url=url, group_port=self.group_port + i, connection_timeout=60)
            client.init_communicator(device=trainer.accelerator.device)
            self.clients.append(client)

    def __call__(self, trainer) -> None:
        acc = trainer.accelerator
        if acc.is_main_process and self.clients is None:
            self._connect(trainer)
        model = acc.unwrap_model(trainer.model)
        with contextlib.ExitStack() as stack:
            if acc.is_main_process:
                for c in self.clients:
                    stack.enter_context(c.weight_update())
            for name, param in model.named_parameters():
                gather = contextlib.nullcontext()
                if hasattr(param, "ds_id"):  # ZeRO-3: every rank joins the gather
                    import deepspeed

                    gather = deepspeed.zero.GatheredParameters([param])
                with gather:
                    if acc.is_main_process:
                        for c in self.clients:
                            c.update_named_param(name, param.data)
        if acc.is_main_process:
            for c in self.clients:
                c.reset_prefix_cache()
        acc.wait_for_everyone()

    def close(self) -> None:
        for c in self.clients or []:
            try:
                c.close_communicator()
            except Exception as e:  # shutting down: report, do not mask the run's own outcome
                logger.warning("closing the NCCL communicator failed: %s", e)


def make_weight_sync(mode: str, pool, output_dir: str, group_port: int):
    mode = resolve_sync_mode(mode)
    logger.info("vLLM weight sync: %s", mode)
    return FilesystemWeightSync(pool, output_dir) if mode == "filesystem" else NcclWeightSync(pool, group_port)

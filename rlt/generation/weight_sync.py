"""Pushing the policy's weights to the vLLM servers after each optimizer step.

filesystem: every rank joins the (ZeRO-3) gather, the main process writes the
    full weights as safetensors to a per-run private directory (a fresh
    /dev/shm/rlt-sync-XXXXXXXX, mode 0700, when /dev/shm has room, else under
    output_dir) and asks each server to reload them, then deletes the previous
    copy. Works on any device.
nccl: trl's VLLMClient broadcasts the weights over NCCL (CUDA only; the
    servers are started with --weight-transfer-config).
Both send the full weights under the base checkpoint's names with any LoRA
adapters merged, never adapter tensors (rlt.models.full_named_weights).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from rlt.errors import ConfigError
from rlt.generation.config import SYNC_MODES

logger = logging.getLogger(__name__)
SHM = Path("/dev/shm")
SYNC_DIR_ENV = "RLT_SYNC_DIR"  # the launcher's private /dev/shm directory for this run's weight copies


def resolve_sync_mode(mode: str) -> str:
    if mode not in SYNC_MODES:
        raise ConfigError(f"vllm_weight_sync={mode!r}: choose from {SYNC_MODES}")
    if mode == "auto":
        return "nccl" if torch.cuda.is_available() else "filesystem"
    if mode == "nccl" and not torch.cuda.is_available():
        raise ConfigError("vllm_weight_sync=nccl needs CUDA; use filesystem (or auto) on this machine")
    return mode


def private_sync_dir(parent: str | Path = SHM) -> Path:
    """A new directory for one run's weight copies: a random name, mode 0700, created with mkdir (which never
    follows or reuses anything already there). The launcher makes it and hands it on in $RLT_SYNC_DIR."""
    return Path(tempfile.mkdtemp(prefix="rlt-sync-", dir=parent))


def checked_private_dir(path: str) -> Path:
    """``path`` if it is a directory (not a symlink) of this user that nobody else may enter, else an error."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise RuntimeError(f"{SYNC_DIR_ENV}={path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{SYNC_DIR_ENV}={path}: not a private directory of this user (a real directory, mode "
                           "0700); refusing to write the policy's weights there")
    return Path(path)


def sync_root(output_dir: str, model_bytes: int) -> tuple[Path, bool]:
    """(directory for the weight copies, whether it was created here and is removed on close).

    The launcher's private /dev/shm directory ($RLT_SYNC_DIR) or, without a launcher, a new private one in
    /dev/shm, when /dev/shm has room for two copies; else <output_dir>/weight_sync.
    """
    given = os.environ.get(SYNC_DIR_ENV)
    root = checked_private_dir(given) if given else SHM
    if root.is_dir() and shutil.disk_usage(root).free > 2.2 * model_bytes:
        return (root, False) if given else (private_sync_dir(root), True)
    return Path(output_dir) / "weight_sync", False


class FilesystemWeightSync:
    def __init__(self, pool, output_dir: str):
        self.pool = pool
        self.output_dir = output_dir
        self.root: Path | None = None
        self.created = False  # root made here (no launcher): removed on close
        self.previous: Path | None = None

    def __call__(self, trainer) -> None:
        from rlt.models import full_state_dict, save_full_model

        acc = trainer.accelerator
        model = acc.unwrap_model(trainer.model)
        # the full weights under the checkpoint's names, LoRA merged (collective under ZeRO-3)
        state_dict = full_state_dict(model, keep=acc.is_main_process)
        if acc.is_main_process:
            if self.root is None:
                nbytes = sum(v.numel() * v.element_size() for v in state_dict.values())
                self.root, self.created = sync_root(self.output_dir, nbytes)
                logger.info("weight sync through %s", self.root)
            target = self.root / f"step-{trainer.state.global_step}"
            save_full_model(model, target, state_dict)
            self.pool.reload_weights(str(target))
            if self.previous is not None and self.previous != target:
                shutil.rmtree(self.previous, ignore_errors=True)
            self.previous = target
        acc.wait_for_everyone()

    def close(self) -> None:
        """Remove the last copy: the directory made here, else the copy itself (the launcher removes its
        /dev/shm directory itself; ``<output_dir>/weight_sync`` goes too once empty)."""
        if self.root is None:
            return
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)
        if not self.root.is_relative_to(SHM):
            with contextlib.suppress(OSError):  # not empty: something else was put there
                self.root.rmdir()


def trl_client(url: str, group_port: int, api_key: str | None, connection_timeout: float = 60):
    """trl's VLLMClient for one server, sending ``api_key`` on every request from its first (trl's own
    /health probe goes without it: /health is open)."""
    from trl.generation.vllm_client import VLLMClient

    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    class Client(VLLMClient):
        def check_server(self, *args, **kwargs):  # runs right after the session is made, before any other request
            if api_key:
                self.session.headers["Authorization"] = f"Bearer {api_key}"
            # trl retries POSTs on 5xx and read errors: a weight update retried after its broadcast would leave
            # the server waiting for a second broadcast that never comes (a hang). Failed connections (nothing
            # sent) are retried for every request, read errors and 5xx answers for GETs only.
            no_post_retry = Retry(total=5, connect=5, read=5, status=3, status_forcelist=[500, 502, 503],
                                  backoff_factor=2, allowed_methods=["GET"])
            self.session.mount("http://", HTTPAdapter(max_retries=no_post_retry))
            self.session.mount("https://", HTTPAdapter(max_retries=no_post_retry))
            return super().check_server(*args, **kwargs)

    return Client(base_url=url, group_port=group_port, connection_timeout=connection_timeout)


def exit_process(message: str) -> None:
    """Log ``message`` and end this process with status 1 at once (from any thread)."""
    logger.error("%s", message)
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)


class SyncWatchdog:
    """Guards a call that talks to the servers outside HTTP (the NCCL rendezvous and broadcast).

    A thread blocked in NCCL waits forever for a server that died, and no Python exception can interrupt
    it. While the block runs, a daemon thread polls each server's /health every ``pool.health_interval``
    seconds. When one server misses ``pool.health_failures`` polls in a row, or the block outlasts
    ``pool.request_timeout`` (vllm_request_timeout), it calls ``on_fail(message)``. The default ends the
    process (status 1); the launcher then stops the run's other ranks and servers.
    """

    def __init__(self, pool, what: str, on_fail=exit_process):
        self.pool, self.what, self.on_fail = pool, what, on_fail
        self._stop = threading.Event()
        self._thread = None

    def _watch(self) -> None:
        p = self.pool
        deadline = time.monotonic() + p.request_timeout
        misses = [0] * len(p.urls)
        while not self._stop.wait(p.health_interval):
            for i in range(len(p.urls)):
                try:
                    up = p.alive(i)
                except Exception as e:  # the watchdog must not die of its own probe: count it as a miss
                    logger.warning("probing %s failed (%s: %s)", p.describe(i), type(e).__name__, e)
                    up = False
                misses[i] = 0 if up else misses[i] + 1
                if self._stop.is_set():
                    return
                if misses[i] >= p.health_failures:
                    return self.on_fail(f"{p.describe(i)} stopped answering /health during {self.what}; a "
                                        "broadcast to it cannot be interrupted, so this process exits")
            if time.monotonic() > deadline:
                return self.on_fail(f"{self.what} did not finish within {p.request_timeout:.0f} s "
                                    "(vllm_request_timeout) although the servers answer /health; a blocked "
                                    "broadcast cannot be interrupted, so this process exits")

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True, name="rlt-sync-watchdog")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class NcclWeightSync:
    """trl's NCCL path, one communicator per server (group port vllm_group_port + i), under a
    :class:`SyncWatchdog` on the main process."""

    def __init__(self, pool, group_port: int, on_fail=exit_process):
        self.pool = pool
        self.group_port = group_port
        self.on_fail = on_fail
        self.clients = None

    def _connect(self, trainer):
        self.clients = []
        for i, url in enumerate(self.pool.urls):
            client = trl_client(url, self.group_port + i, self.pool.api_key)
            try:
                client.init_communicator(device=trainer.accelerator.device)
            except Exception as e:
                raise RuntimeError(f"vLLM server {url}: the NCCL weight-sync group on port {self.group_port + i} "
                                   f"(vllm_group_port + {i}) could not be set up ({type(e).__name__}: {e}); if "
                                   "another run uses that port, choose another vllm_group_port") from e
            self.clients.append(client)

    def __call__(self, trainer) -> None:
        acc = trainer.accelerator
        guard = (SyncWatchdog(self.pool, "the NCCL weight sync", self.on_fail) if acc.is_main_process
                 else contextlib.nullcontext())
        with guard:
            self._sync(trainer)
        acc.wait_for_everyone()

    def _sync(self, trainer) -> None:
        acc = trainer.accelerator
        if acc.is_main_process and self.clients is None:
            self._connect(trainer)
        from rlt.models import full_named_weights, full_weight_metadata

        model = acc.unwrap_model(trainer.model)
        weights = full_named_weights(model)  # LoRA merged; one gather per parameter, every rank iterates
        if not acc.is_main_process:
            for _ in weights:  # take part in the ZeRO-3 gathers
                pass
            return
        if len(self.clients) == 1:
            # trl's batched, packed broadcast: the metadata first, then the tensors as the iterator yields them
            self.clients[0].update_named_params(full_weight_metadata(model), weights)
        else:
            # one pass over the weights for all servers: each tensor goes to every server while it is gathered
            with contextlib.ExitStack() as stack:
                for c in self.clients:
                    stack.enter_context(c.weight_update())
                for name, tensor in weights:
                    for c in self.clients:
                        c.update_named_param(name, tensor)
        for i in range(len(self.clients)):
            self.pool.reset_prefix_cache(i)   # checked (trl's call ignores a refusal), under the pool's watchdog

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

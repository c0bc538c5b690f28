"""Frozen (never trained) models next to the policy: the student and the reference."""
from __future__ import annotations

import logging
import os

import torch

from rlt.errors import ConfigError

logger = logging.getLogger(__name__)


def freeze(model):
    """Eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def deepspeed_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.deepspeed_config["zero_optimization"]["stage"])


def shards_to(model, device: str = "cpu") -> tuple[int, set[str]]:
    """Move the ZeRO-3 shards of ``model`` (each rank's part of each parameter, DeepSpeed's ``param.ds_tensor``)
    to ``device``, in place: DeepSpeed copies a shard to the GPU when it gathers the parameter for a forward and
    frees the gathered copy after, so between uses the model holds no GPU memory. Parameters DeepSpeed keeps
    whole (``ds_persist``, the small ones) stay. With hierarchical partitioning (hpZ) the node-local secondary
    copy (``ds_secondary_tensor``), which gathers then read, moves too. Shards go to pageable memory (pinning
    30 GB a node for a 7B student and reference would outweigh the faster copies). Returns (bytes moved,
    devices they came from).

    DeepSpeed places a shard once, where the model was partitioned (``from_pretrained`` under ZeRO-3 does it
    with the training config: on the GPU); a later engine with ``offload_param`` does not move it.
    """
    moved, came_from = 0, set()
    target = torch.device(device)
    for p in model.parameters():
        if getattr(p, "ds_persist", False):
            continue
        for attr in ("ds_tensor", "ds_secondary_tensor"):
            shard = getattr(p, attr, None)
            if shard is None or shard.device == target:
                continue
            came_from.add(str(shard.device))
            shard.data = shard.data.to(target)   # the same tensor object: DeepSpeed's attributes on it stay
            moved += shard.numel() * shard.element_size()
    return moved, came_from


def offload_frozen(model, what: str) -> None:
    """:func:`shards_to` the CPU, logged (with where the shards were: the check that the offload happened)."""
    moved, came_from = shards_to(model, "cpu")
    if moved:
        logger.info("offload_untrained_models: %s: %.2f GB of ZeRO-3 shards moved from %s to CPU memory", what,
                    moved / 1e9, ", ".join(sorted(came_from)))
    else:
        logger.info("offload_untrained_models: %s: its ZeRO-3 shards are already in CPU memory", what)


def prepare_frozen(model, accelerator, offload: bool = False, what: str = "student"):
    """Place a frozen model for inference beside the policy.

    With DeepSpeed it goes through trl's ``prepare_deepspeed`` (ZeRO-3: sharded like the policy; other
    stages: replicated). ``offload`` then moves its ZeRO-3 shards to CPU memory (:func:`offload_frozen`),
    whence each forward streams them in; with other ZeRO stages it cannot apply (a warning says so). Without
    DeepSpeed it is moved to the accelerator device. Returns the object that keeps it alive; the module
    itself is changed in place and stays usable as before.
    """
    freeze(model)
    stage = deepspeed_stage(accelerator)
    if stage is None:
        if offload:
            logger.warning("offload_untrained_models needs DeepSpeed ZeRO-3; keeping %s on %s",
                           type(model).__name__, accelerator.device)
        return model.to(accelerator.device)
    from trl.models.utils import prepare_deepspeed

    if offload and stage != 3:
        logger.warning("offload_untrained_models needs ZeRO-3 (this run uses ZeRO-%d); the frozen model is "
                       "replicated on every device", stage)
    engine = prepare_deepspeed(model, accelerator)
    if offload and stage == 3:
        offload_frozen(model, what)
    return engine


# In a checkpoint-N folder once sync_ref_model has changed the reference. A subfolder, not a second *.safetensors
# beside model.safetensors: vLLM loads every *.safetensors at the top of a folder without an index file (a
# checkpoint's policy is one file up to 50 GB), so it would load both under the same names when given checkpoint-N.
REFERENCE_FILE = "reference_model/model.safetensors"


def save_frozen_weights(model, path: str, is_main: bool) -> None:
    """Write ``model``'s parameters to one safetensors file at ``path`` (parameter names as
    ``named_parameters`` gives them, each in its own dtype). Every rank must call it (ZeRO-3 gathers one
    parameter at a time); the main process writes, to a temporary name first so that a cut-off save leaves no
    file that looks whole."""
    from rlt.models import full_state_dict

    state = full_state_dict(model, keep=is_main)
    if is_main:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)


def load_frozen_weights(model, path: str) -> None:
    """Copy the tensors of :func:`save_frozen_weights`' file into ``model``'s parameters, in place. Every rank
    must call it. Names and shapes are checked on every rank before anything is copied (a mismatch is one
    :class:`ConfigError` naming the file). Under ZeRO-3 each parameter is gathered, rank 0 writes it, and
    DeepSpeed re-partitions it into the existing shards (which stay where they are, e.g. offloaded to CPU);
    otherwise every rank copies its replica."""
    from safetensors import safe_open

    from rlt.models import checkpoint_name, gathered, is_zero3

    params = [(checkpoint_name(n), p) for n, p in model.named_parameters()]
    with safe_open(path, framework="pt", device="cpu") as f:
        stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in params}
        if stored != shapes:
            missing = sorted(set(shapes) - set(stored))
            extra = sorted(set(stored) - set(shapes))
            wrong = sorted(n for n in set(shapes) & set(stored) if shapes[n] != stored[n])
            raise ConfigError(f"{path}: does not fit the model it would restore (missing {missing[:3]}, unexpected "
                              f"{extra[:3]}, other shapes {wrong[:3]}); it was saved for another model")
        writer = not is_zero3([p for _, p in params]) or torch.distributed.get_rank() == 0
        for n, p in params:
            with gathered([p], modifier_rank=0), torch.no_grad():
                if writer:
                    p.data.copy_(f.get_tensor(n))

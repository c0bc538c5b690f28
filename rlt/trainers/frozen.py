"""Frozen (never trained) models next to the policy: the student and the reference."""
from __future__ import annotations

import copy
import logging

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


def prepare_frozen(model, accelerator, offload: bool = False):
    """Place a frozen model for inference beside the policy.

    With DeepSpeed ZeRO-3 it is sharded like the policy (an inference engine
    without optimizer); ``offload`` keeps its shards in CPU memory and streams
    them in for each forward. With other ZeRO stages it is replicated (stage 0)
    and ``offload`` cannot apply (a warning says so). Without DeepSpeed it is
    moved to the accelerator device. Returns the object that keeps it alive;
    the module itself is changed in place and stays usable as before.
    """
    freeze(model)
    stage = deepspeed_stage(accelerator)
    if stage is None:
        if offload:
            logger.warning("offload_untrained_models needs DeepSpeed ZeRO-3; keeping %s on %s",
                           type(model).__name__, accelerator.device)
        return model.to(accelerator.device)
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    zero = cfg["zero_optimization"]
    zero.pop("offload_optimizer", None)
    if stage == 3:
        hidden = getattr(model.config, "hidden_size", None)
        if hidden:
            zero.update({"reduce_bucket_size": hidden * hidden, "stage3_param_persistence_threshold": 10 * hidden,
                         "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        else:
            zero.pop("offload_param", None)
    else:
        if offload:
            logger.warning("offload_untrained_models needs ZeRO-3 (this run uses ZeRO-%d); the frozen model is "
                           "replicated on every device", stage)
        zero.clear()
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine

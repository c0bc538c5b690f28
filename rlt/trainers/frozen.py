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

    With DeepSpeed it goes through trl's ``prepare_deepspeed`` (ZeRO-3: sharded like the policy; other
    stages: replicated). ``offload`` keeps its ZeRO-3 shards in CPU memory and streams them in for each
    forward; with other ZeRO stages it cannot apply (a warning says so). Without DeepSpeed it is moved to
    the accelerator device. Returns the object that keeps it alive; the module itself is changed in place
    and stays usable as before.
    """
    freeze(model)
    stage = deepspeed_stage(accelerator)
    if stage is None:
        if offload:
            logger.warning("offload_untrained_models needs DeepSpeed ZeRO-3; keeping %s on %s",
                           type(model).__name__, accelerator.device)
        return model.to(accelerator.device)
    if not (offload and stage == 3):
        from trl.models.utils import prepare_deepspeed

        if offload:
            logger.warning("offload_untrained_models needs ZeRO-3 (this run uses ZeRO-%d); the frozen model is "
                           "replicated on every device", stage)
        return prepare_deepspeed(model, accelerator)
    # Offloading only the frozen models needs offload_param in their own engine config, which trl's
    # prepare_deepspeed (it copies the training config) cannot take.
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        cfg.pop(key, None)
    zero = cfg["zero_optimization"]
    zero.pop("offload_optimizer", None)
    hidden = getattr(model.config, "hidden_size", None)
    if hidden:
        zero.update({"reduce_bucket_size": hidden * hidden, "stage3_param_persistence_threshold": 10 * hidden,
                     "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
    zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine

"""From a composed Hydra config to trl/transformers arguments, in one place.

Every top-level key of the composed config is either
  * an rlt key (``RLT_KEYS``: models, data, reward, server, run bookkeeping),
  * an upstream or older-transformers name translated by ``RENAMES``, or
  * a field of the trl config class of the run (``SFTConfig``/``GRPOConfig``).
Anything else is an error that names the key, so a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

# Keys rlt consumes itself; they never reach the trl config.
RLT_KEYS = {
    # run bookkeeping
    "trainer", "results_dir", "resume_from", "save_final_model", "train_batch_size",
    # model
    "model_name_or_path", "dtype", "attn_implementation", "student_model",
    "offload_untrained_models", "use_reference_teacher_model",
    # data
    "dataset_id_or_path", "dataset_split", "data_format", "student_system_prompt", "teacher_system_prompt",
    "drop_bad_rows", "max_samples", "max_prompt_length",
    # RL logging
    "logging_prob", "save_completions_probability",
    # reward (rlt/rewards/config.py)
    "answer_log_prob_coeff", "kl_penalty_reward_coeff", "normalize_log_prob_fn", "clip_log_prob",
    "normalize_kl_fn", "clip_kl", "reduction_log_prob_fn", "reduction_kl_fn", "use_schulman_kl_estimation",
    "not_matched_penalty", "unbias_teacher_log_probs", "unbias_student_log_probs_temp",
    "include_teacher_think_entropy", "reward_micro_batch_size", "reward_logit_chunk_size", "reward_vocab_chunk_size",
    # vLLM server (rlt/generation)
    "vllm_host", "vllm_port", "vllm_num_servers", "vllm_weight_sync", "vllm_enable_prefix_caching",
    "vllm_server_timeout", "vllm_request_timeout", "vllm_log_dir",
}

# Older / upstream names -> trl 1.16 / transformers 5.x names.
RENAMES = {
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "torch_dtype": "dtype",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
    "generation_aggregation_steps": "steps_per_generation",
}


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key to change."""


DIST_ENV_PREFIXES = ("ACCELERATE_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def non_distributed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the variables of a distributed launch, for helper
    processes (a tiny-model build, a vLLM server) started from inside one."""
    return {k: v for k, v in (os.environ if env is None else env).items() if not k.startswith(DIST_ENV_PREFIXES)}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(train_batch_size: int, per_device_train_batch_size: int, num_processes: int) -> int:
    """train_batch_size / (per_device_train_batch_size x num_processes), or a ConfigError naming all three."""
    denom = per_device_train_batch_size * num_processes
    if train_batch_size <= 0 or denom <= 0 or train_batch_size % denom:
        raise ConfigError(
            f"train_batch_size={train_batch_size} must be a positive multiple of per_device_train_batch_size="
            f"{per_device_train_batch_size} x number of processes={num_processes} (= {denom}); change "
            "train_batch_size, per_device_train_batch_size or the process count")
    return train_batch_size // denom


def translate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Apply RENAMES; a key given under both names is an error."""
    out = dict(cfg)
    for old, new in RENAMES.items():
        if old in out:
            if new in out:
                raise ConfigError(f"both {old!r} and {new!r} are set; keep only {new!r}")
            out[new] = out.pop(old)
    return out


def split_config(cfg: dict[str, Any], args_cls) -> tuple[dict[str, Any], dict[str, Any]]:
    """(rlt settings, trl-config kwargs) from a flat composed config."""
    cfg = translate(cfg)
    fields = {f.name for f in dataclasses.fields(args_cls)}
    rlt, trl_kwargs, unknown = {}, {}, []
    for key, value in cfg.items():
        if key == "hydra":
            continue
        if key in RLT_KEYS:
            rlt[key] = value
        elif key in fields:
            trl_kwargs[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)}: neither rlt settings nor fields of "
                          f"{args_cls.__name__}; check the spelling or remove them")
    return rlt, trl_kwargs


def build_args(cfg: dict[str, Any], args_cls, num_processes: int | None = None, validate=None, **forced):
    """rlt settings and an ``args_cls`` instance (SFTConfig / GRPOConfig) for this run.

    gradient_accumulation_steps is derived from train_batch_size when null;
    without CUDA, bf16/tf32 are switched off (the CPU DeepSpeed path).
    ``validate(rlt, kwargs, num_processes)`` runs before ``args_cls`` checks anything itself.
    """
    import torch

    rlt, kw = split_config(cfg, args_cls)
    n = num_processes or world_size()
    derived = gradient_accumulation(rlt["train_batch_size"], kw["per_device_train_batch_size"], n)
    if kw.get("gradient_accumulation_steps") is None:
        kw["gradient_accumulation_steps"] = derived
    elif kw["gradient_accumulation_steps"] != derived:
        raise ConfigError(
            f"gradient_accumulation_steps={kw['gradient_accumulation_steps']} disagrees with train_batch_size="
            f"{rlt['train_batch_size']} / (per_device_train_batch_size={kw['per_device_train_batch_size']} x "
            f"processes={n}) = {derived}; set gradient_accumulation_steps=null to derive it")
    if not torch.cuda.is_available():
        kw["bf16"], kw["tf32"] = False, None
        # Without an accelerator accelerate leaves the backend unset and then
        # counts a single process; name gloo so every rank is counted.
        if num_processes is None and world_size() > 1:
            kw.setdefault("ddp_backend", "gloo")
    if kw.get("report_to") in (None, "none", []):
        kw["report_to"] = "none"
    kw.update(forced)
    if validate is not None:
        validate(rlt, kw, n)
    return rlt, args_cls(**kw)

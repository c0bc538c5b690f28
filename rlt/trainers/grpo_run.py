"""Building and validating a teacher GRPO run from a composed config."""
from __future__ import annotations

import logging

from rlt.config import ConfigError

logger = logging.getLogger(__name__)


def validate_grpo(rlt_cfg: dict, kw: dict, num_processes: int) -> None:
    """Startup checks on the translated settings, with errors that say which key to change."""
    from rlt.rewards.config import RewardConfig

    g = kw.get("num_generations")
    if g is None or g < 2:
        raise ConfigError(f"num_generations={g}: GRPO needs at least 2 completions per prompt")
    if rlt_cfg["train_batch_size"] % g:
        raise ConfigError(f"train_batch_size={rlt_cfg['train_batch_size']} must be a multiple of num_generations={g} "
                          "(each optimizer step sees whole groups)")
    ga, spg = kw["gradient_accumulation_steps"], kw.get("steps_per_generation")
    if spg is not None and ga % spg:
        raise ConfigError(
            f"generation_aggregation_steps={spg} must divide gradient_accumulation_steps={ga} (= train_batch_size / "
            f"(per_device_train_batch_size x {num_processes} processes)); set generation_aggregation_steps={ga} "
            "or a divisor of it, or null for one generation round per optimizer step")
    gen_batch = kw["per_device_train_batch_size"] * num_processes * (spg or ga)
    if gen_batch % g:
        raise ConfigError(
            f"one generation round holds per_device_train_batch_size x processes x generation_aggregation_steps = "
            f"{gen_batch} completions, not a multiple of num_generations={g}; change generation_aggregation_steps or "
            "num_generations")
    if not rlt_cfg.get("student_model"):
        raise ConfigError("student_model is required for the teacher reward (a path or hub id); it is never "
                          "replaced by the reference model")
    if rlt_cfg.get("vllm_host") and kw.get("use_vllm"):
        raise ConfigError("use_vllm=true (trl's colocated engine) and vllm_host (rlt's servers) exclude each other; "
                          "set use_vllm=false for server rollouts")
    if rlt_cfg.get("use_reference_teacher_model") and not kw.get("beta"):
        raise ConfigError("use_reference_teacher_model=true needs a reference model: set beta > 0")
    RewardConfig.from_dict(rlt_cfg)  # coefficient / reduction shapes


def build_grpo_dataset(tokenizer, examples, fmt, max_prompt_length: int | None):
    """Columns prompt (RL prompt text), question, solution, student_system.

    Prompts longer than max_prompt_length tokens are dropped (count logged);
    an error if none remain.
    """
    import datasets

    from rlt.data.text import student_system, teacher_prompt

    rows, dropped = [], 0
    for ex in examples:
        prompt = teacher_prompt(tokenizer, ex.question, ex.solution, fmt)
        if max_prompt_length is not None and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_prompt_length:
            dropped += 1
            continue
        rows.append({"prompt": prompt, "question": ex.question, "solution": ex.solution,
                     "student_system": student_system(ex.system, fmt)})
    if dropped:
        logger.warning("dropped %d of %d prompts longer than max_prompt_length=%s tokens", dropped, len(examples),
                       max_prompt_length)
    if not rows:
        raise ConfigError(f"no prompt fits max_prompt_length={max_prompt_length}; raise it")
    return datasets.Dataset.from_list(rows)


def build_teacher_grpo_trainer(cfg: dict, num_processes: int | None = None):
    """(trainer, tokenizer, rlt settings) for a composed teacher GRPO config."""
    from trl import GRPOConfig

    from rlt.config import build_args
    from rlt.data.formats import resolve_format
    from rlt.data.loading import load_examples
    from rlt.models import load_causal_lm, load_tokenizer, same_tokenizer
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.teacher_reward import TeacherReward
    from rlt.train import save_composed_config
    from rlt.trainers.teacher_grpo import TeacherGRPOTrainer

    rlt_cfg, args = build_args(cfg, GRPOConfig, num_processes=num_processes, validate=validate_grpo)
    reward_cfg = RewardConfig.from_dict(rlt_cfg)
    save_composed_config(cfg, args.output_dir)
    fmt = resolve_format(rlt_cfg["data_format"], rlt_cfg["dataset_id_or_path"],
                         student_system_prompt=rlt_cfg.get("student_system_prompt"),
                         teacher_system_prompt=rlt_cfg.get("teacher_system_prompt"))
    tokenizer = load_tokenizer(rlt_cfg["model_name_or_path"])
    if not same_tokenizer(tokenizer, load_tokenizer(rlt_cfg["student_model"])):
        raise ConfigError(f"student_model={rlt_cfg['student_model']} has a different tokenizer from the teacher "
                          f"{rlt_cfg['model_name_or_path']}; the reward scores both with one tokenizer")
    examples = load_examples(rlt_cfg["dataset_id_or_path"], fmt, rlt_cfg["dataset_split"],
                             drop_bad_rows=rlt_cfg["drop_bad_rows"], max_samples=rlt_cfg["max_samples"])
    dataset = build_grpo_dataset(tokenizer, examples, fmt, rlt_cfg.get("max_prompt_length"))
    model = load_causal_lm(rlt_cfg["model_name_or_path"], rlt_cfg["dtype"], rlt_cfg["attn_implementation"])
    student = load_causal_lm(rlt_cfg["student_model"], rlt_cfg["dtype"], rlt_cfg["attn_implementation"])
    reward = TeacherReward(student, tokenizer, fmt, reward_cfg, teacher_temperature=args.temperature)
    logger.info("teacher GRPO: %d prompts, %d generations each, gradient_accumulation_steps=%d, "
                "steps_per_generation=%s", len(dataset), args.num_generations, args.gradient_accumulation_steps,
                args.steps_per_generation)
    pool = sync = None
    if rlt_cfg.get("vllm_host"):
        from rlt.generation.client import VLLMServerPool
        from rlt.generation.weight_sync import make_weight_sync

        pool = VLLMServerPool(rlt_cfg["vllm_host"], rlt_cfg["vllm_port"], rlt_cfg["vllm_num_servers"],
                              rlt_cfg.get("vllm_log_dir"), connect_timeout=rlt_cfg["vllm_server_timeout"],
                              request_timeout=rlt_cfg["vllm_request_timeout"])
        sync = make_weight_sync(rlt_cfg["vllm_weight_sync"], pool, args.output_dir, args.vllm_group_port)
        logger.info("rollouts from %d vLLM server(s) at %s", len(pool.urls), ", ".join(pool.urls))
    trainer = TeacherGRPOTrainer(
        model=model, student_model=student, teacher_reward=reward, args=args, train_dataset=dataset,
        processing_class=tokenizer, use_reference_teacher_model=rlt_cfg["use_reference_teacher_model"],
        offload_untrained_models=rlt_cfg["offload_untrained_models"], logging_prob=rlt_cfg["logging_prob"],
        save_completions_probability=rlt_cfg["save_completions_probability"], rollout_pool=pool, weight_sync=sync)
    return trainer, tokenizer, rlt_cfg


def run_teacher_grpo(cfg: dict) -> None:
    from rlt.train import train_and_save

    trainer, tokenizer, rlt_cfg = build_teacher_grpo_trainer(cfg)
    try:
        train_and_save(trainer, tokenizer, rlt_cfg, trainer.args.output_dir)
    finally:
        if trainer.weight_sync is not None:
            trainer.weight_sync.close()

"""Building and validating a teacher GRPO run from typed settings (:class:`rlt.config.TrainSettings`)."""
from __future__ import annotations

import logging

from rlt.errors import ConfigError

logger = logging.getLogger(__name__)


def validate_sampling(args) -> None:
    """Generation values that can never work, refused at startup with the key to change."""
    checks = [
        (args.temperature > 0, f"temperature={args.temperature} must be > 0 (GRPO samples its completions)"),
        (0 < args.top_p <= 1, f"top_p={args.top_p} must be in (0, 1]"),
        (args.top_k is None or args.top_k >= 0, f"top_k={args.top_k} must be >= 0 (0 or null: off)"),
        (args.min_p is None or 0 <= args.min_p <= 1, f"min_p={args.min_p} must be in [0, 1] (or null)"),
        (args.repetition_penalty > 0, f"repetition_penalty={args.repetition_penalty} must be > 0"),
        (args.max_completion_length is not None and args.max_completion_length >= 1,
         f"max_completion_length={args.max_completion_length} must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def validate_grpo(s, num_processes: int) -> None:
    """Startup checks of a teacher GRPO run, with errors that say which key to change. Touches no model."""
    args = s.args
    # num_generations >= 2 and whole groups per step are checked where the settings are built (rlt.config)
    ga, spg = args.gradient_accumulation_steps, args.steps_per_generation
    if spg is not None and ga % spg:
        raise ConfigError(
            f"generation_aggregation_steps={spg} must divide gradient_accumulation_steps={ga} (= train_batch_size / "
            f"(per_device_train_batch_size x {num_processes} processes)); set generation_aggregation_steps={ga} "
            "or a divisor of it, or null for one generation round per optimizer step")
    if not s.reward.student_model:
        raise ConfigError("student_model is required for the teacher reward (a path, hub id or rlt-tiny:SEED); it "
                          "is never replaced by the reference model")
    if s.rollout.vllm_local_servers:
        raise ConfigError(f"vllm_local_servers={s.rollout.vllm_local_servers} is for rlt.distill and rlt.eval; "
                          "training starts its servers with ./launch_with_server.sh NUM_VLLM NUM_TRAIN RECIPE")
    if s.rollout.vllm_host and args.use_vllm:
        raise ConfigError("use_vllm=true (trl's colocated engine) and vllm_host (rlt's servers) exclude each other; "
                          "set use_vllm=false for server rollouts")
    if s.reward.use_reference_teacher_model and not args.beta and not s.lora.use_peft:  # PEFT: adapters off
        raise ConfigError("use_reference_teacher_model=true needs a reference model: set beta > 0")
    if not args.beta and args.sync_ref_model and not s.lora.use_peft:  # trl refuses it, after the models load
        raise ConfigError("beta=0 keeps no reference model, so sync_ref_model=true has nothing to update: set "
                          "sync_ref_model=false too (or beta > 0)")
    heads = [m for m in (s.lora.lora_target_modules or []) if m.split(".")[-1] == "lm_head"] if s.lora.use_peft else []
    if heads:
        raise ConfigError(f"lora_target_modules={s.lora.lora_target_modules}: {heads[0]} is the output layer, which "
                          "the teacher reward applies itself (h W^T + b from its weight) and would score without the "
                          "adapter; adapt other modules (all-linear leaves the output layer out)")
    from rlt.rewards.logprobs import check_backend

    check_backend(s.reward.reward_logprob_backend)   # e.g. fused on a machine without CUDA
    if s.rollout.vllm_host:
        from rlt.generation.weight_sync import resolve_sync_mode

        resolve_sync_mode(s.rollout.vllm_weight_sync)   # e.g. nccl on a machine without CUDA
    validate_sampling(args)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int | None:
    """Key + value cache bytes per token of a decoder (layers x 2 x KV heads x head size x dtype); None when the
    config does not say (e.g. a multimodal wrapper)."""
    c = getattr(config, "text_config", None) or config
    try:
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return c.num_hidden_layers * 2 * kv * head_dim * dtype_bytes
    except (AttributeError, TypeError):
        return None


def check_in_process_generation(s, gpu_bytes: int | None, config) -> None:
    """Without vLLM (no vllm_host, use_vllm=false) trl generates each rank's whole generation batch in one
    ``model.generate``, whose KV cache grows to the batch's longest completion; when that cache at the
    completion cap would exceed the GPU (``gpu_bytes``; None: no GPU, nothing to check), one line before three
    models load on every rank and the first round runs out of memory. trl's continuous batching (a paged cache
    of bounded size) is not checked."""
    args = s.args
    paged = getattr(args, "use_transformers_continuous_batching", False) or getattr(args, "use_transformers_paged", False)
    if gpu_bytes is None or s.rollout.vllm_host or args.use_vllm or paged:
        return
    per_token = kv_bytes_per_token(config, {"float32": 4, "float64": 8}.get(str(s.model.dtype), 2))  # the weights'

    if per_token is None:
        return
    seqs = args.per_device_train_batch_size * (args.steps_per_generation or args.gradient_accumulation_steps)
    need = seqs * args.max_completion_length * per_token   # prompts not counted
    if need > gpu_bytes:
        raise ConfigError(
            f"in-process generation (no vllm_host, use_vllm=false) holds {seqs} sequences of up to "
            f"{args.max_completion_length} new tokens per rank at once: a KV cache of up to {need / 1e9:.0f} GB "
            f"(prompts not counted), more than the GPU's {gpu_bytes / 1e9:.0f} GB; run the rollouts on vLLM servers "
            "(./launch_with_server.sh V T ...), or lower per_device_train_batch_size, generation_aggregation_steps "
            "or max_completion_length")


def build_grpo_dataset(tokenizer, examples, fmt, max_prompt_length: int | None):
    """Columns prompt (RL prompt text), question, solution, student_system.

    Prompts longer than max_prompt_length tokens are dropped (count logged); an error if none remain.
    """
    import datasets

    from rlt.data.loading import drop_longer
    from rlt.data.text import student_system, teacher_prompt

    ds = datasets.Dataset.from_list([
        {"prompt": teacher_prompt(tokenizer, ex.question, ex.solution, fmt), "question": ex.question,
         "solution": ex.solution, "student_system": student_system(ex.system, fmt)} for ex in examples])
    return drop_longer(ds, lambda r: len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]),
                       max_prompt_length, "prompt", "max_prompt_length")


def build_teacher_grpo_trainer(s, examples=None, fmt=None):
    """(trainer, tokenizer) for typed teacher GRPO settings; ``examples``/``fmt`` when already loaded."""
    from rlt.data.loading import load_dataset_examples
    from rlt.models import load_causal_lm, load_tokenizer, peft_config, same_tokenizer
    from rlt.rewards.teacher_reward import TeacherReward
    from rlt.runs import save_composed_config
    from rlt.trainers.teacher_grpo import TeacherGRPOTrainer

    args = s.args
    if examples is None:
        examples, fmt = load_dataset_examples(s.data, s.format)
    save_composed_config(s.composed, args.output_dir, args.process_index == 0)
    tokenizer = load_tokenizer(s.model.require_model())
    from rlt.data.text import check_end_of_turn

    check_end_of_turn(tokenizer, fmt, s.model.model_name_or_path)   # before the models load
    if not same_tokenizer(tokenizer, load_tokenizer(s.reward.student_model)):
        raise ConfigError(f"student_model={s.reward.student_model} has a different tokenizer from the teacher "
                          f"{s.model.model_name_or_path}; the reward scores both with one tokenizer")
    dataset = build_grpo_dataset(tokenizer, examples, fmt, s.data.max_prompt_length)
    model = load_causal_lm(s.model.model_name_or_path, s.model.dtype, s.model.attn_implementation)
    student = load_causal_lm(s.reward.student_model, s.model.dtype, s.model.attn_implementation)
    reward = TeacherReward(student, tokenizer, fmt, s.reward, teacher_temperature=args.temperature)
    logger.info("teacher GRPO: %d prompts, %d generations each, gradient_accumulation_steps=%d, "
                "steps_per_generation=%s", len(dataset), args.num_generations, args.gradient_accumulation_steps,
                args.steps_per_generation)
    pool = sync = None
    if s.rollout.vllm_host:
        import os

        from rlt.generation.client import API_KEY_ENV, VLLMServerPool
        from rlt.generation.weight_sync import make_weight_sync

        r = s.rollout
        pool = VLLMServerPool(r.vllm_host, r.vllm_port, r.vllm_num_servers, r.vllm_log_dir,
                              connect_timeout=args.vllm_server_timeout, request_timeout=r.vllm_request_timeout,
                              api_key=os.environ.get(API_KEY_ENV))  # set by launch_with_server.sh
        sync = make_weight_sync(r.vllm_weight_sync, pool, args.output_dir, args.vllm_group_port)
        logger.info("rollouts from %d vLLM server(s) at %s", len(pool.urls), ", ".join(pool.urls))
    if s.lora.use_peft and args.sync_ref_model:
        # trl keeps no reference copy under PEFT (its reference is the base model, adapters disabled) and refuses
        # sync_ref_model there; the recipes set it for full fine-tuning.
        if args.process_index == 0:
            logger.warning("use_peft=true: the reference model is the base model with the adapters disabled; "
                           "sync_ref_model=true is ignored")
        args.sync_ref_model = False
    t = s.teacher_run
    trainer = TeacherGRPOTrainer(
        model=model, student_model=student, teacher_reward=reward, args=args, train_dataset=dataset,
        processing_class=tokenizer, use_reference_teacher_model=s.reward.use_reference_teacher_model,
        offload_untrained_models=t.offload_untrained_models, logging_prob=t.logging_prob,
        save_completions_probability=t.save_completions_probability, rollout_pool=pool, weight_sync=sync,
        peft_config=peft_config(s.lora))
    return trainer, tokenizer


def run_teacher_grpo(s, examples=None, fmt=None) -> None:
    from rlt.runs import train_and_save

    trainer, tokenizer = build_teacher_grpo_trainer(s, examples, fmt)
    try:
        train_and_save(trainer, tokenizer, s.run, trainer.args.output_dir)
    finally:
        if trainer.weight_sync is not None:
            trainer.weight_sync.close()

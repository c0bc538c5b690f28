"""The run concern: bookkeeping settings of a training run and the helpers every trainer shares
(resume, final save, the composed config written next to the checkpoints)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import field
from pathlib import Path

from rlt.errors import ConfigError
from rlt.logging_utils import rank

logger = logging.getLogger(__name__)
TRAINERS = ("sft", "student_sft", "teacher_grpo")


@dataclasses.dataclass
class RunConfig:
    """Settings of every training run (trl's TrainingArguments hold the rest)."""

    trainer: str | None = field(default=None, metadata={
        "help": f"which trainer runs: one of {list(TRAINERS)} (set by the trainer_cfg group)"})
    results_dir: str = field(default="results", metadata={"help": "parent of output_dir in the recipes"})
    resume_from: str | None = field(default=None, metadata={
        "help": "checkpoint directory to resume from (null: the newest checkpoint in output_dir, if any)"})
    save_final_model: bool = field(default=True, metadata={
        "help": "save the final model + tokenizer to output_dir (with use_peft: the LoRA adapter)"})
    save_merged_model: bool = field(default=False, metadata={
        "help": "also save the full model with any LoRA adapters merged + tokenizer to <output_dir>/merged "
                "(loadable with AutoModelForCausalLM, vLLM and rlt.distill/eval/score)"})
    wandb_project: str | None = field(default=None, metadata={
        "help": "wandb project when report_to includes wandb (null: $WANDB_PROJECT, else rlt; runs are written "
                "under <output_dir>/wandb)"})
    train_batch_size: int = field(default=16, metadata={
        "help": "global batch = per_device_train_batch_size x processes x gradient accumulation (derived)"})

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise ConfigError(f"trainer={self.trainer!r}: choose one of {list(TRAINERS)} (the trainer_cfg group sets it)")
        if self.train_batch_size < 1:
            raise ConfigError(f"train_batch_size={self.train_batch_size} must be >= 1")


@dataclasses.dataclass
class TeacherRunConfig:
    """Settings only teacher RL runs have."""

    offload_untrained_models: bool = field(default=False, metadata={
        "help": "keep the student's and the reference's ZeRO-3 shards in CPU memory between uses"})
    logging_prob: float = field(default=0.1, metadata={
        "help": "probability of writing each scored completion to <output_dir>/teacher_chats/log.txt"})
    save_completions_probability: float = field(default=0.0, metadata={
        "help": "probability of saving each completion with its reward to <output_dir>/stored_completions/"})

    def __post_init__(self):
        for key in ("logging_prob", "save_completions_probability"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} must be a probability in [0, 1]")


def configure_reporting(run: RunConfig, args) -> None:
    """wandb (when reported to) writes under output_dir, into the project ``wandb_project``, never into the
    working directory or a project named after the library."""
    if "wandb" in (args.report_to or []):
        os.environ["WANDB_PROJECT"] = run.wandb_project or os.environ.get("WANDB_PROJECT") or "rlt"
        os.environ["WANDB_DIR"] = str(Path(args.output_dir).resolve())
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)


RUN_LOCK = ".rlt_run.lock"


def run_lock(output_dir: str, hold: bool):
    """The lock of a training run on ``output_dir``/.rlt_run.lock (two runs there would write the same
    checkpoint-N folders and rlt_config.yaml): ``hold`` takes it for the run (the main process), else it is only
    checked (``--check``, which creates nothing). See :func:`rlt.procs.exclusive_lock`."""
    from rlt.procs import exclusive_lock

    path = Path(output_dir) / RUN_LOCK
    return exclusive_lock(path, f"output_dir={output_dir}: another training run is using it (it holds {path}); "
                                "wait for it to end, or give another output_dir", hold=hold)


def last_checkpoint(output_dir: str, resume_from: str | None) -> str | None:
    """The checkpoint to resume from: ``resume_from`` if set, else the newest complete one in output_dir
    (:func:`complete_checkpoints`). Refused in one line: a checkpoint without optimizer state, and a
    ``resume_from`` older than complete checkpoints in output_dir (a later plain rerun would resume those)."""
    complete = complete_checkpoints(output_dir)
    if resume_from:
        if not Path(resume_from, "trainer_state.json").exists():
            raise ConfigError(f"resume_from={resume_from}: not a checkpoint (no trainer_state.json)")
        if not _has_optimizer(resume_from):  # a finished run's output_dir also holds trainer_state.json (save_state)
            raise ConfigError(f"resume_from={resume_from}: not a checkpoint (no optimizer state: a finished run's "
                              "output, or saved with save_only_model?); give one of its checkpoint-N folders, or "
                              "model_name_or_path= to start from its weights")
        step = checkpoint_step(resume_from)
        newer = [Path(c).name for c in complete if checkpoint_step(c) > step]
        if newer:   # a later rerun without resume_from would resume those, another run's or this one's future
            raise ConfigError(f"resume_from={resume_from}: output_dir={output_dir} holds newer checkpoints "
                              f"({', '.join(newer)}); a later plain rerun would resume them, not this branch. Give "
                              "this branch a new output_dir, or move them away first (or resume the newest with a "
                              "plain rerun, without resume_from)")
        return resume_from
    if not complete:
        return None
    ckpt = complete[-1]
    if not _has_optimizer(ckpt):
        raise ConfigError(f"output_dir={output_dir}: {Path(ckpt).name} holds no optimizer state (saved with "
                          "save_only_model=true?), so it cannot be resumed; give model_name_or_path="
                          f"{ckpt} to start a new run from its weights, in another output_dir")
    return ckpt


def checkpoint_step(ckpt: str | Path) -> int:
    """The step a checkpoint was saved at: its trainer_state.json's global_step, else N of checkpoint-N (-1)."""
    try:
        return int(json.loads(Path(ckpt, "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        name = Path(ckpt).name
        return int(name.rsplit("-", 1)[1]) if "-" in name and name.rsplit("-", 1)[1].isdigit() else -1


def _has_optimizer(ckpt: str | Path) -> bool:
    """DeepSpeed's global_step* folder or the Trainer's optimizer.pt."""
    return any(Path(ckpt).glob("global_step*")) or Path(ckpt, "optimizer.pt").exists()


def complete_checkpoints(output_dir: str) -> list[str]:
    """The checkpoint-N folders of ``output_dir``, oldest first, that hold trainer_state.json: the Trainer writes
    it last (after the model, optimizer and RNG states), so one without it was cut off while being saved (skipped,
    with a warning naming it)."""
    if not output_dir or not Path(output_dir).is_dir():
        return []
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

    out = []
    for ckpt in sort_checkpoints(output_dir, PREFIX_CHECKPOINT_DIR):
        if Path(ckpt, "trainer_state.json").is_file():
            out.append(ckpt)
        elif rank() == 0:   # checked by --check and again by every rank
            logger.warning("%s has no trainer_state.json (its save was cut off): not resuming from it", ckpt)
    return out


# Keys a resumed run may change: how long it runs, what it saves and logs, how it reaches its vLLM servers, and
# how it fits in memory or runs faster with the same results (the fixes for an out-of-memory crash or a timeout).
RESUME_MAY_CHANGE = frozenset({
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_checkpointing", "attn_implementation",
    "offload_untrained_models", "ddp_timeout", "dataloader_num_workers", "reward_micro_batch_size",
    "reward_logit_chunk_size", "reward_vocab_chunk_size", "reward_token_budget", "reward_packing",
    "reward_logprob_backend",
    "max_steps", "num_train_epochs", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "save_final_model", "save_merged_model", "save_completions_probability", "logging_steps", "logging_prob",
    "report_to", "wandb_project", "run_name", "results_dir", "output_dir", "resume_from", "vllm_host", "vllm_port",
    "vllm_num_servers", "vllm_log_dir", "vllm_server_timeout", "vllm_request_timeout", "vllm_bind_all",
    "vllm_gpu_memory_utilization", "vllm_enforce_eager", "vllm_enable_prefix_caching", "vllm_weight_sync",
    "vllm_group_port"})


def changed_keys(before: dict, now: dict) -> list[str]:
    """The keys (sorted) whose values differ between two settings dicts, compared as JSON (tuples and lists
    alike); a key missing on one side counts as None there."""
    return sorted(k for k in before.keys() | now.keys() if _as_json(before.get(k)) != _as_json(now.get(k)))


def _as_json(value) -> str:
    """A settings value as comparable text (tuples and lists alike)."""
    return json.dumps(value, sort_keys=True, default=str)


def keys_added_since(before: dict, now: dict, defaults: dict) -> set[str]:
    """Keys of rlt's settings (``defaults``: {key: default}) a saved config lacks (rlt gained them after that
    run) and that ``now`` leaves at their defaults: the run behaves as before, so they are no change."""
    return {k for k in now if k not in before and k in defaults and _as_json(now[k]) == _as_json(defaults[k])}


def check_resume(composed: dict, output_dir: str, resume_from: str | None, defaults: dict | None = None) -> None:
    """A run that would resume the checkpoint in ``output_dir`` on its own (no ``resume_from``) must have the
    settings of the run that wrote it (its ``rlt_config.yaml``), but for :data:`RESUME_MAY_CHANGE`: else the new
    settings would be silently dropped for the old run's weights, optimizer and schedule. One line naming the
    keys that differ. With ``resume_from`` the differences are logged and the resume goes ahead. ``defaults``
    ({key: default} of rlt's settings): keys the saved run predates, left at their defaults, are no change."""
    ckpt = last_checkpoint(output_dir, resume_from)
    saved = Path(ckpt).parent / "rlt_config.yaml" if ckpt else None
    if saved is None:
        return
    if not saved.is_file():
        logger.warning("%s: resuming %s without checking its settings (the run left no rlt_config.yaml)",
                       Path(ckpt).parent, Path(ckpt).name)
        return
    from omegaconf import OmegaConf

    before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    added = keys_added_since(before, composed, defaults or {})
    if added:
        logger.info("%s predates rlt's %s; left at their defaults, they change nothing", saved, ", ".join(sorted(added)))
    changed = [f"{k}: {before.get(k)!r} -> {composed.get(k)!r}"
               for k in changed_keys(before, composed) if k not in RESUME_MAY_CHANGE and k not in added]
    if not changed:
        return
    shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
    if resume_from:
        logger.warning("resume_from=%s: resuming with settings that differ from that run's (%s)", resume_from, shown)
        return
    raise ConfigError(f"output_dir={output_dir} holds a run to resume ({Path(ckpt).name}) made with other settings "
                      f"({shown}); resuming would keep that run's weights, optimizer and schedule. Give another "
                      f"output_dir (or remove this one) to start afresh, or resume_from={ckpt} to resume it anyway")


CRASH_ENV = "RLT_INJECT_CRASH_AFTER_STEP"


def crash_after_step_callback(step: int):
    """Fault injection for resume tests: hard-exit right after the checkpoint of ``step`` is written."""
    from transformers import TrainerCallback

    class _Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= step:
                logger.warning("%s=%d: exiting after the checkpoint of step %d", CRASH_ENV, step, state.global_step)
                logging.shutdown()
                os._exit(17)

    return _Crash()


def train_and_save(trainer, tokenizer, run: RunConfig, output_dir: str) -> None:
    """Train (resuming when a checkpoint exists) and save the final model + tokenizer; once per process: it
    ends the process group of a distributed run."""
    if os.environ.get(CRASH_ENV):
        trainer.add_callback(crash_after_step_callback(int(os.environ[CRASH_ENV])))
    configure_reporting(run, trainer.args)
    ckpt = last_checkpoint(output_dir, run.resume_from)
    if ckpt:
        logger.info("resuming from %s", ckpt)
    trainer.train(resume_from_checkpoint=ckpt)
    trainer.save_state()  # output_dir/trainer_state.json: the log history rlt.plot reads
    if run.save_final_model:
        trainer.save_model(output_dir)
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(output_dir)
        logger.info("final %s saved to %s", "LoRA adapter" if _is_peft(trainer) else "model", output_dir)
    if run.save_merged_model:
        save_merged_model(trainer, tokenizer, str(Path(output_dir) / "merged"))
    # No rank leaves while another still saves, and none exits with the process group alive: a rank that did
    # could abort in the communication backend's teardown (seen once on CPU: rank 1 "terminate called without an
    # active exception" while rank 0 still wrote the tokenizer), and torchrun then kills the others.
    trainer.accelerator.wait_for_everyone()
    trainer.end()   # transformers' end of script: accelerate's end_training, which destroys the process group


def _is_peft(trainer) -> bool:
    from rlt.models import is_peft

    return is_peft(trainer.accelerator.unwrap_model(trainer.model))


def save_merged_model(trainer, tokenizer, path: str) -> None:
    """The trained model with its LoRA adapters merged (the full weights without PEFT) + tokenizer, as a
    checkpoint AutoModelForCausalLM loads. Every process must call it (ZeRO-3 gathers)."""
    from rlt.models import full_state_dict, save_full_model

    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    state = full_state_dict(model, keep=acc.is_main_process)
    if acc.is_main_process:
        save_full_model(model, path, state, tokenizer)
        logger.info("merged model saved to %s", path)
    acc.wait_for_everyone()


def save_composed_config(cfg: dict, output_dir: str, is_main_process: bool) -> None:
    """<output_dir>/rlt_config.yaml: the composed config of the run (main process only)."""
    if is_main_process:
        from omegaconf import OmegaConf

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(cfg), Path(output_dir) / "rlt_config.yaml")

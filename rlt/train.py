"""Training entry point. Normally started through ./launch.sh, which runs ``--check`` first.

    python -m rlt.train RECIPE [key=value ...]          # RECIPE: a name in cfgs/run_cfg or a .yaml path
    python -m rlt.train RECIPE [key=value ...] --cfg job  # print the composed config
    python -m rlt.train RECIPE [key=value ...] --check [--processes N]  # validate settings and data, exit
    python -m rlt.train --help                            # every rlt key with its default
(``run_cfg@_global_=RECIPE``, Hydra's spelling, is accepted for RECIPE.) Overrides use Hydra's syntax.
"""
from __future__ import annotations

import logging
import os
import sys

from omegaconf import OmegaConf

from rlt.cli import check_writable, user_errors
from rlt.config import build_train_settings, compose, concern_defaults, num_processes_from_env, train_help
from rlt.errors import ConfigError
from rlt.logging_utils import setup_logging

logger = logging.getLogger("rlt.train")


def check_inputs(s) -> None:
    """The models and the checkpoint a run will load exist (no model is loaded)."""
    from rlt.models import check_model
    from rlt.runs import check_resume

    check_model(s.model.require_model(), "model_name_or_path")  # a hub id: its config.json is asked for
    if s.run.trainer == "teacher_grpo" and s.reward.student_model:
        check_model(s.reward.student_model, "student_model")
    # a resume_from without trainer_state.json is refused; a checkpoint resumed on its own needs the same settings
    check_resume(s.composed, s.args.output_dir, s.run.resume_from, concern_defaults())


def check_gpus_for(num_processes: int) -> None:
    """With CUDA, each training process needs a GPU of its own: no more processes than visible GPUs."""
    from rlt.models import check_cuda_usable, gpu_count

    check_cuda_usable()
    gpus = gpu_count()
    if gpus and num_processes > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"NUM_PROCESSES={num_processes}: {gpus} GPU(s) visible"
                          + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                          + "; each training process needs a GPU of its own")


def check_generation_memory(s) -> None:
    """In-process generation's KV cache against the first GPU's memory (nothing to check without CUDA)."""
    import torch

    if not torch.cuda.is_available() or s.rollout.vllm_host or s.args.use_vllm:
        return
    from transformers import AutoConfig

    from rlt.models import resolve_model_path
    from rlt.trainers.grpo_run import check_in_process_generation

    config = AutoConfig.from_pretrained(resolve_model_path(s.model.require_model()))
    check_in_process_generation(s, torch.cuda.get_device_properties(0).total_memory, config)


def check(cfg: dict, num_processes: int | None = None):
    """Validate a composed config and its data without loading a model or writing anything but a probe in
    output_dir. Returns (settings, examples, format)."""
    from rlt.data.loading import load_dataset_examples
    from rlt.trainers.grpo_run import validate_grpo

    n = num_processes_from_env() if num_processes is None else num_processes
    # num_processes is given by launchers checking a run before it starts (a plain process); inside a
    # launched rank it is None and the settings are derived from the launch (gloo on CPU).
    if num_processes is not None:
        check_gpus_for(num_processes)
    s = build_train_settings(cfg, num_processes=num_processes)
    if s.run.trainer == "teacher_grpo":
        validate_grpo(s, n)
    check_inputs(s)
    if s.run.trainer == "teacher_grpo" and num_processes is not None:
        check_generation_memory(s)
    examples, fmt = load_dataset_examples(s.data, s.format)
    check_writable(s.args.output_dir)
    if num_processes is not None:   # before a launch: no other run may hold output_dir
        from rlt.runs import run_lock

        run_lock(s.args.output_dir, hold=False)
    return s, examples, fmt


def run(cfg: dict) -> None:
    from rlt.logging_utils import rank
    from rlt.runs import run_lock

    s, examples, fmt = check(cfg)
    lock = run_lock(s.args.output_dir, hold=True) if rank() == 0 else None  # noqa: F841  (held for the run)
    if s.run.trainer == "teacher_grpo":
        from rlt.trainers.grpo_run import run_teacher_grpo

        run_teacher_grpo(s, examples, fmt)
    else:
        from rlt.trainers.sft import run_sft

        run_sft(s, examples, fmt)


def parse_argv(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    """(recipe, overrides, flags) from ``RECIPE [key=value ...] [--check] [--cfg job]`` in any order;
    ``run_cfg@_global_=NAME`` (Hydra's spelling) names the recipe too."""
    recipe, overrides, flags = None, [], set()
    rest = list(argv)
    while rest:
        a = rest.pop(0)
        if a == "--cfg":
            what = rest.pop(0) if rest else ""
            if what != "job":
                raise ConfigError(f"--cfg {what}: only --cfg job (print the composed config) is supported")
            flags.add("cfg")
        elif a in ("--check", "--help", "-h"):
            flags.add(a.lstrip("-")[0] if a == "-h" else a.lstrip("-"))
        elif a == "--processes":
            n = rest.pop(0) if rest else ""
            if not n.isdigit() or int(n) < 1:
                raise ConfigError(f"--processes {n}: give the number of training processes (>= 1)")
            flags.add(f"processes={n}")
        elif a.startswith("run_cfg@_global_="):
            recipe = a.split("=", 1)[1]
        elif "=" in a:
            overrides.append(a)
        elif recipe is None and not a.startswith("-"):
            recipe = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give RECIPE [key=value ...] [--check] [--cfg job]")
    return recipe, overrides, flags


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    with user_errors("rlt.train"):
        recipe, overrides, flags = parse_argv(argv)
        if "help" in flags or "h" in flags:
            sys.stdout.write(train_help())
            return
        if recipe is None:
            raise ConfigError("give a recipe: a name under cfgs/run_cfg or a .yaml path (--help lists every key)")
        composed = compose(recipe, overrides)
        if "cfg" in flags:
            sys.stdout.write(OmegaConf.to_yaml(OmegaConf.create(composed)))
            return
        if "check" in flags:
            from rlt.procs import set_parent_death_signal

            set_parent_death_signal(os.getppid())  # a kill of launch.sh while it waits here stops this too
            n = next((int(f.split("=")[1]) for f in flags if f.startswith("processes=")), 1)
            s, examples, _ = check(composed, num_processes=n)
            logger.info("settings and data are valid: trainer %s, %d examples, output_dir %s", s.run.trainer,
                        len(examples), s.args.output_dir)
            return
        run(composed)


if __name__ == "__main__":
    main()

"""Training entry point (Hydra). Normally started through ./launch.sh.

    python -m rlt.train run_cfg@_global_=teacher_sft [key=value ...]
    python -m rlt.train run_cfg@_global_=teacher_sft --cfg job   # print the composed config
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlt.logging_utils import setup_logging

logger = logging.getLogger("rlt.train")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "cfgs")


def compose(run_cfg: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved config of ``run_cfg`` with Hydra overrides, outside @hydra.main."""
    from hydra import compose as hydra_compose, initialize_config_dir

    name = Path(run_cfg).name.removesuffix(".yaml")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"run_cfg@_global_={name}", *overrides])
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out


def last_checkpoint(output_dir: str, resume_from: str | None) -> str | None:
    """The checkpoint to resume from: ``resume_from`` if set, else the newest in output_dir."""
    if resume_from:
        if not Path(resume_from, "trainer_state.json").exists():
            raise FileNotFoundError(f"resume_from={resume_from}: not a checkpoint (no trainer_state.json)")
        return resume_from
    if not Path(output_dir).is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir)


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


def train_and_save(trainer, tokenizer, rlt_cfg: dict, output_dir: str) -> None:
    """Train (resuming when a checkpoint exists) and save the final model + tokenizer."""
    if os.environ.get(CRASH_ENV):
        trainer.add_callback(crash_after_step_callback(int(os.environ[CRASH_ENV])))
    ckpt = last_checkpoint(output_dir, rlt_cfg.get("resume_from"))
    if ckpt:
        logger.info("resuming from %s", ckpt)
    trainer.train(resume_from_checkpoint=ckpt)
    trainer.save_state()  # output_dir/trainer_state.json: the log history rlt.plot reads
    if rlt_cfg.get("save_final_model", True):
        trainer.save_model(output_dir)
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(output_dir)
        logger.info("final model saved to %s", output_dir)


def save_composed_config(cfg: dict, output_dir: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(cfg), Path(output_dir) / "rlt_config.yaml")


def run(cfg: dict) -> None:
    kind = cfg.get("trainer")
    if kind in ("sft", "student_sft"):
        from rlt.trainers.sft import run_sft

        run_sft(cfg, student=kind == "student_sft")
    elif kind == "teacher_grpo":
        from rlt.trainers.grpo_run import run_teacher_grpo

        run_teacher_grpo(cfg)
    else:
        raise ValueError(f"trainer={kind!r}: expected sft, student_sft or teacher_grpo (set by trainer_cfg)")


@hydra.main(config_path="../cfgs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    run(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()

"""Config composition, upstream override keys, and the batch arithmetic."""
from pathlib import Path

import pytest
from trl import SFTConfig

from rlt.config import ConfigError, build_args, gradient_accumulation, split_config
from rlt.train import CONFIG_DIR, compose

RUN_CFGS = sorted(p.stem for p in Path(CONFIG_DIR, "run_cfg").glob("*.yaml"))


@pytest.mark.parametrize("run", RUN_CFGS)
def test_every_run_cfg_composes_and_maps_to_trl(run):
    cfg = compose(run)
    assert cfg["trainer"] in ("sft", "student_sft", "teacher_grpo")
    if cfg["trainer"] != "teacher_grpo":
        rlt, kw = split_config(cfg, SFTConfig)  # raises on any key trl does not know
        assert "model_name_or_path" in rlt and "learning_rate" in kw


def test_teacher_sft_paper_values():
    cfg = compose("teacher_sft")
    assert cfg["model_name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg["dataset_id_or_path"] == "bespokelabs/Bespoke-Stratos-17k"
    assert (cfg["num_train_epochs"], cfg["learning_rate"], cfg["lr_scheduler_type"], cfg["warmup_ratio"]) == (10, 1e-5, "cosine", 0.05)
    assert (cfg["train_batch_size"], cfg["per_device_train_batch_size"], cfg["max_length"]) == (16, 1, 16384)
    assert (cfg["adam_beta2"], cfg["weight_decay"], cfg["bf16"], cfg["gradient_checkpointing"]) == (0.95, 1e-4, True, True)
    assert cfg["output_dir"] == "results/pre_rl_model"
    assert cfg["report_to"] == "none"


@pytest.mark.parametrize("key,value,expect", [
    ("model_name_or_path", "my/model", "my/model"), ("dataset_id_or_path", "x.jsonl", "x.jsonl"),
    ("learning_rate", "3e-6", 3e-6), ("num_train_epochs", "2", 2), ("max_steps", "7", 7),
    ("train_batch_size", "32", 32), ("per_device_train_batch_size", "2", 2), ("output_dir", "/tmp/o", "/tmp/o"),
    ("seed", "3", 3), ("report_to", "wandb", "wandb"), ("save_strategy", "steps", "steps"),
])
def test_upstream_override_keys(key, value, expect):
    assert compose("teacher_sft", [f"{key}={value}"])[key] == expect


def test_results_dir_moves_output_dir():
    assert compose("teacher_sft", ["results_dir=/data/r"])["output_dir"] == "/data/r/pre_rl_model"


def test_gradient_accumulation_arithmetic():
    assert gradient_accumulation(16, 1, 8) == 2
    assert gradient_accumulation(1024, 1, 4) == 256
    with pytest.raises(ConfigError) as e:
        gradient_accumulation(16, 3, 2)
    assert all(s in str(e.value) for s in ("train_batch_size=16", "per_device_train_batch_size=3", "processes=2"))


def test_build_args_translates_and_derives(tmp_path):
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path}", "train_batch_size=8"])
    rlt, args = build_args(cfg, SFTConfig, num_processes=2)
    assert args.gradient_accumulation_steps == 4
    assert args.warmup_steps == 0.05  # warmup_ratio -> transformers 5 warmup_steps (a ratio below 1)
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    assert rlt["model_name_or_path"] == "rlt-tiny:0"
    bad = dict(cfg, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="disagrees"):
        build_args(bad, SFTConfig, num_processes=2)


def test_unknown_and_duplicate_keys_are_errors():
    cfg = compose("tiny_teacher_sft")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['lerning_rate'\]"):
        split_config({**cfg, "lerning_rate": 1}, SFTConfig)
    with pytest.raises(ConfigError, match="both 'max_seq_length' and 'max_length'"):
        split_config({**cfg, "max_seq_length": 10}, SFTConfig)
    rlt, kw = split_config({k: v for k, v in cfg.items() if k != "max_length"} | {"max_seq_length": 10}, SFTConfig)
    assert kw["max_length"] == 10


def test_cli_prints_composed_config():
    from conftest import run_cmd
    import sys

    out = run_cmd([sys.executable, "-m", "rlt.train", "run_cfg@_global_=teacher_sft", "learning_rate=2e-5", "--cfg", "job"]).stdout
    assert "learning_rate: 2.0e-05" in out and "model_name_or_path: Qwen/Qwen2.5-7B-Instruct" in out

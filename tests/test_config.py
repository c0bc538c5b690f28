"""Config composition, upstream override keys, and the batch arithmetic."""
from pathlib import Path

import pytest
from trl import SFTConfig

from rlt.config import CONFIG_DIR, build_train_settings, compose, gradient_accumulation, split
from rlt.errors import ConfigError
from rlt.models import ModelConfig
from rlt.runs import RunConfig

RUN_CFGS = sorted(p.stem for p in Path(CONFIG_DIR, "run_cfg").glob("*.yaml"))


@pytest.mark.parametrize("run", RUN_CFGS)
def test_every_run_cfg_composes_to_typed_settings(run):
    cfg = compose(run, ["output_dir=/tmp/unused"])
    n = 2 if run.startswith("tiny") else (4 if run == "teacher_rlt" else 8)  # the layouts they are meant for
    s = build_train_settings(cfg, num_processes=n)  # raises on any unknown or mistyped key
    assert s.run.trainer in ("sft", "student_sft", "teacher_grpo")
    assert s.model.model_name_or_path and s.args.learning_rate > 0
    assert (s.reward is not None) == (s.run.trainer == "teacher_grpo")


def test_teacher_sft_paper_values():
    cfg = compose("teacher_sft")
    assert cfg["model_name_or_path"] == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg["dataset_id_or_path"] == "bespokelabs/Bespoke-Stratos-17k"
    assert (cfg["num_train_epochs"], cfg["learning_rate"], cfg["lr_scheduler_type"], cfg["warmup_ratio"]) == (10, 1e-5, "cosine", 0.05)
    assert (cfg["train_batch_size"], cfg["per_device_train_batch_size"], cfg["max_length"]) == (16, 1, 16384)
    assert (cfg["adam_beta2"], cfg["weight_decay"], cfg["bf16"], cfg["gradient_checkpointing"]) == (0.95, 1e-4, True, True)
    assert cfg["output_dir"] == "results/pre_rl_model"
    assert cfg["report_to"] == "none"


def test_student_sft_paper_values():
    """The students' recipe is SkyThought's Bespoke-17k 7B one, which the reference's students were trained with
    (3 epochs, lr 1e-5 cosine, 10% warm-up, batch 96 = 8 GPUs x 12 accumulation, HF's AdamW defaults)."""
    cfg = compose("student_sft")
    assert (cfg["num_train_epochs"], cfg["learning_rate"], cfg["lr_scheduler_type"], cfg["warmup_ratio"]) == (3, 1e-5, "cosine", 0.1)
    assert (cfg["train_batch_size"], cfg["per_device_train_batch_size"], cfg["max_length"]) == (96, 1, 16384)
    assert (cfg["adam_beta1"], cfg["adam_beta2"], cfg["weight_decay"], cfg["max_grad_norm"]) == (0.9, 0.999, 0.0, 1.0)
    assert cfg["save_total_limit"] == 2


@pytest.mark.parametrize("key,value,expect", [
    ("model_name_or_path", "my/model", "my/model"), ("dataset_id_or_path", "x.jsonl", "x.jsonl"),
    ("learning_rate", "3e-6", 3e-6), ("num_train_epochs", "2", 2), ("max_steps", "7", 7),
    ("train_batch_size", "32", 32), ("per_device_train_batch_size", "2", 2), ("output_dir", "/tmp/o", "/tmp/o"),
    ("seed", "3", 3), ("report_to", "wandb", "wandb"), ("save_strategy", "steps", "steps"),
])
def test_upstream_override_keys(key, value, expect):
    assert compose("teacher_sft", [f"{key}={value}"])[key] == expect


@pytest.mark.parametrize("recipe,override,read", [
    ("tiny_teacher_sft", "torch_dtype=bfloat16", lambda s: s.model.dtype == "bfloat16"),  # old name, recipe: new
    ("tiny_teacher_sft", "+torch_dtype=bfloat16", lambda s: s.model.dtype == "bfloat16"),
    ("tiny_teacher_sft", "max_seq_length=64", lambda s: s.args.max_length == 64),
    ("teacher_sft", "+warmup_steps=0.2", lambda s: s.args.warmup_steps == 0.2),  # new name, recipe: old
    ("tiny_teacher_rlt", "+steps_per_generation=2", lambda s: s.args.steps_per_generation == 2),  # default: 4
    ("tiny_teacher_rlt", "generation_aggregation_steps=2", lambda s: s.args.steps_per_generation == 2),
])
def test_either_name_of_a_renamed_key_overrides_the_recipe(recipe, override, read):
    """The names --help lists as translated work as overrides, whichever of the two the recipe uses."""
    assert read(build_train_settings(compose(recipe, [override]), num_processes=1))


def test_results_dir_moves_output_dir():
    assert compose("teacher_sft", ["results_dir=/data/r"])["output_dir"] == "/data/r/pre_rl_model"


def test_gradient_accumulation_arithmetic():
    assert gradient_accumulation(16, 1, 8) == 2
    assert gradient_accumulation(1024, 1, 4) == 256
    with pytest.raises(ConfigError) as e:
        gradient_accumulation(16, 3, 2)
    assert all(s in str(e.value) for s in ("train_batch_size=16", "per_device_train_batch_size=3", "processes=2"))


def test_settings_translate_and_derive(tmp_path):
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path}", "train_batch_size=8"])
    s = build_train_settings(cfg, num_processes=2)
    assert s.args.gradient_accumulation_steps == 4
    assert s.args.warmup_steps == 0.05  # warmup_ratio -> transformers 5 warmup_steps (a ratio below 1)
    assert s.args.report_to == []  # "none": nothing is reported
    assert s.model.model_name_or_path == "rlt-tiny:0" and s.run.train_batch_size == 8
    bad = dict(cfg, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="disagrees"):
        build_train_settings(bad, num_processes=2)


def test_unknown_mistyped_and_duplicate_keys_are_errors():
    cfg = compose("tiny_teacher_sft")
    concerns = (RunConfig, ModelConfig)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lerning_rate'\]"):
        split({k: cfg[k] for k in ("trainer", "learning_rate")} | {"lerning_rate": 1}, concerns, SFTConfig)
    with pytest.raises(ConfigError, match="both 'max_seq_length' and 'max_length'"):
        split({"trainer": "sft", "max_length": 5, "max_seq_length": 10}, concerns, SFTConfig)
    objs, kw = split({"trainer": "sft", "max_seq_length": 10, "torch_dtype": "float32"}, concerns, SFTConfig)
    assert kw["max_length"] == 10 and objs[ModelConfig].dtype == "float32"
    with pytest.raises(ConfigError, match=r"train_batch_size='many': .*Integer"):
        split({"trainer": "sft", "train_batch_size": "many"}, concerns, SFTConfig)
    with pytest.raises(ConfigError, match=r"dtype='float8'.*choose one of"):
        split({"trainer": "sft", "dtype": "float8"}, concerns, SFTConfig)
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'"):
        compose("tiny_teacher_sft", ["lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"\+logging_first_step=VALUE"):
        compose("tiny_teacher_sft", ["logging_first_step=true"])
    assert compose("tiny_teacher_sft", ["+logging_first_step=true"])["logging_first_step"] is True


@pytest.mark.parametrize("recipe, override, message", [
    # a renamed key the recipe does not set: the +key hint works under either name
    ("tiny_teacher_rlt", "warmup_ratio=0.1", "warmup_ratio is a trl setting this recipe does not set: add it as "
                                             "+warmup_ratio=VALUE"),
    # a key of the other trainer: no +key hint (it would then be refused as no field of GRPOConfig)
    ("tiny_teacher_rlt", "max_length=4096", "max_length is a setting of the other trainer (SFT or GRPO), not of this "
                                            "recipe's"),
    ("tiny_teacher_sft", "num_generations=8", "num_generations is a setting of the other trainer"),
    ("tiny_teacher_sft", "model_cfg=tiny", "model_cfg is a config group: write model_cfg@_global_=NAME (NAME one of "
                                           "['qwen2.5_7b_instruct', 'tiny'])"),
])
def test_override_hints_lead_somewhere(recipe, override, message):
    with pytest.raises(ConfigError) as e:
        compose(recipe, [override])
    assert str(e.value).startswith(message)
    if "+warmup_ratio" in message:
        assert compose(recipe, ["+warmup_ratio=0.1"])["warmup_ratio"] == 0.1
    if "@_global_" in message:
        assert compose(recipe, ["model_cfg@_global_=tiny"])["model_name_or_path"] == "rlt-tiny:0"


def test_a_list_key_given_one_word_says_how_to_write_a_list():
    cfg = compose("tiny_teacher_sft", ["lora_target_modules=all-linear"])
    with pytest.raises(ConfigError, match=r"lora_target_modules='all-linear': LoraConfig\.lora_target_modules takes a "
                                          r"list: write lora_target_modules=\[a,b\]"):
        build_train_settings(cfg, num_processes=1)


def test_no_key_is_declared_twice():
    """Each rlt key lives in one dataclass, and none shadows a field of the trl config classes."""
    from trl import GRPOConfig

    from rlt.config import CONCERNS, field_names

    seen = {}
    for cls in CONCERNS.values():
        for name in field_names(cls):
            assert name not in seen, f"{name} in {cls.__name__} and {seen[name]}"
            seen[name] = cls.__name__
    trl_fields = set(field_names(SFTConfig)) | set(field_names(GRPOConfig))
    assert sorted(set(seen) & trl_fields) == []


def test_recipe_from_any_path(tmp_path):
    own = tmp_path / "tiny_teacher_sft.yaml"  # same name as a built-in recipe, different content
    own.write_text(Path(CONFIG_DIR, "run_cfg", "tiny_teacher_sft.yaml").read_text().replace("max_steps: 4", "max_steps: 11"))
    assert compose(str(own))["max_steps"] == 11
    assert compose("tiny_teacher_sft")["max_steps"] == 4
    assert compose(str(Path(CONFIG_DIR, "run_cfg", "tiny_teacher_sft.yaml")))["max_steps"] == 4
    with pytest.raises(ConfigError, match="no such file"):
        compose(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not in cfgs/run_cfg"):
        compose("no_such_recipe")


@pytest.mark.slow
def test_cli_prints_composed_config():
    from conftest import run_cmd
    import sys

    out = run_cmd([sys.executable, "-m", "rlt.train", "run_cfg@_global_=teacher_sft", "learning_rate=2e-5", "--cfg", "job"]).stdout
    assert "learning_rate: 2.0e-05" in out and "model_name_or_path: Qwen/Qwen2.5-7B-Instruct" in out
    out = run_cmd([sys.executable, "-m", "rlt.train", "run_cfg@_global_=teacher_rlt", "kl_penalty_reward_coeff=[0,0]",
                   "--cfg", "job"]).stdout
    assert "kl_penalty_reward_coeff:\n- 0\n- 0" in out

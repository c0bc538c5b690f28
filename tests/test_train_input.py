"""Bad training input is one line naming the key, refused by --check (and its validate functions) before any
model loads or process starts."""
import pytest

from conftest import ROOT, run_cmd
from rlt import launch_with_server
from rlt.config import build_train_settings, compose
from rlt.errors import ConfigError
from rlt.train import check


def settings(tmp_path, recipe, *overrides):
    return build_train_settings(compose(recipe, [f"output_dir={tmp_path / 'out'}", *overrides]), num_processes=1)


def refused(fn, *args, match: str):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------------------- 1, 2, 4, 8. values
@pytest.mark.parametrize("recipe, override, match", [
    # field types
    ("tiny_teacher_sft", "max_steps=abc", r"max_steps='abc': SFTConfig\.max_steps takes an integer"),
    ("tiny_teacher_sft", "learning_rate=abc", r"learning_rate='abc': SFTConfig\.learning_rate takes a number"),
    ("tiny_teacher_sft", "per_device_train_batch_size=x", r"per_device_train_batch_size='x': .* takes an integer"),
    ("tiny_teacher_sft", "gradient_checkpointing=maybe", r"gradient_checkpointing='maybe': .* takes true or false"),
    ("tiny_teacher_rlt", "temperature=abc", r"temperature='abc': GRPOConfig\.temperature takes a number"),
    # ranges trl cannot use, refused before it builds its config
    ("tiny_teacher_rlt", "num_generations=0", r"num_generations=0: GRPO needs at least 2"),
    ("tiny_teacher_sft", "max_length=0", r"max_length=0 must be >= 1"),
    ("tiny_teacher_rlt", "max_completion_length=0", r"max_completion_length=0 must be >= 1"),
    ("tiny_teacher_sft", "max_steps=-5", r"max_steps=-5: give -1 .* or a number of steps >= 1"),
    ("tiny_teacher_sft", "max_steps=0", r"max_steps=0: give -1"),
    ("tiny_teacher_rlt", "generation_aggregation_steps=0", r"steps_per_generation=0 must be >= 1"),
    ("tiny_teacher_rlt", "+num_iterations=0", r"num_iterations=0 must be >= 1"),
    ("tiny_teacher_sft", "save_steps=0 save_strategy=steps", r"save_steps=0\.0: with save_strategy=steps give a number of steps >= 1"),
    # names trl checks only when it first uses them (after a generation round, or after the model loads)
    ("tiny_teacher_rlt", "loss_type=bogus", r"loss_type='bogus': choose one of \['grpo', 'dr_grpo', 'dapo'"),
    ("tiny_teacher_rlt", "scale_rewards=bogus", r"scale_rewards='bogus': choose group, batch or none"),
    ("tiny_teacher_sft", "report_to=wanbd", r"report_to=wanbd: unknown integration\(s\) \['wanbd'\]; choose from "),
    # SFTConfig keys an rlt SFT run never uses (trl ignored them, or refused them after the model loaded)
    ("tiny_teacher_sft", "+packing=true", r"packing=True: rlt's SFT does not use it \(rlt's rows are not packed"),
    ("tiny_student_sft", "+padding_free=true", r"padding_free=True: rlt's SFT does not use it \(trl refuses it after the model"),
    ("tiny_teacher_sft", "+completion_only_loss=false", r"completion_only_loss=False: rlt's SFT does not use it"),
    ("tiny_student_sft", "+assistant_only_loss=true", r"assistant_only_loss=True: rlt's SFT does not use it"),
    ("tiny_teacher_sft", "+eos_token=x", r"eos_token=x: rlt's SFT does not use it \(the data is tokenized with"),
])
def test_trl_values_are_type_and_range_checked(tmp_path, recipe, override, match):
    refused(settings, tmp_path, recipe, *override.split(" "), match=match)


def test_trl_values_convert_as_a_user_expects(tmp_path):
    s = settings(tmp_path, "tiny_teacher_sft", "learning_rate=1e-5", "max_steps='7'", "run_name=123")
    assert (s.args.learning_rate, s.args.max_steps, s.args.run_name) == (1e-5, 7, "123")


def test_max_steps_minus_one_means_epochs(tmp_path):
    assert settings(tmp_path, "tiny_teacher_sft", "max_steps=-1").args.max_steps == -1


# ----------------------------------------------------------------------------------------- 3, 4. paths
def test_missing_models_and_checkpoints_fail_check(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = tmp_path / "nothing"
    finished = tmp_path / "finished"  # a finished run's output_dir: its trainer_state.json, no optimizer state
    finished.mkdir()
    (finished / "trainer_state.json").write_text("{}")
    for recipe, override, match in [
        ("tiny_teacher_sft", f"model_name_or_path={nothing}", r"model_name_or_path=\S+nothing: no such directory"),
        ("tiny_teacher_sft", f"model_name_or_path={empty}", r"model_name_or_path=\S+empty has no config\.json"),
        ("tiny_teacher_sft", "model_name_or_path=./no_such_model", r"model_name_or_path=\./no_such_model: no such"),
        ("tiny_teacher_rlt", f"student_model={nothing}", r"student_model=\S+nothing: no such directory"),
        ("tiny_teacher_sft", f"resume_from={nothing}", r"resume_from=\S+nothing: not a checkpoint"),
        ("tiny_teacher_sft", f"resume_from={finished}", r"resume_from=\S+finished: not a checkpoint \(no optimizer "
                                                        r"state: a finished run's output, or saved with "
                                                        r"save_only_model\?\); give one of its"),
    ]:
        cfg = compose(recipe, [f"output_dir={tmp_path / 'out'}", override])
        refused(check, cfg, 1, match=match)
    assert not (tmp_path / "out").exists()


def test_resume_skips_a_checkpoint_whose_save_was_cut_off(tmp_path, caplog):
    from rlt.runs import last_checkpoint

    out = tmp_path / "out"
    assert last_checkpoint(str(out), None) is None
    for step in (5, 10, 20):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    for step in (5, 10):  # complete: the Trainer writes trainer_state.json last
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        (out / f"checkpoint-{step}" / "global_step{step}").mkdir()   # DeepSpeed's optimizer state
    (out / "checkpoint-20" / "model.safetensors").write_text("")  # killed while saving
    assert last_checkpoint(str(out), None) == str(out / "checkpoint-10")
    assert "checkpoint-20 has no trainer_state.json" in caplog.text
    (out / "checkpoint-10" / "trainer_state.json").unlink()
    (out / "checkpoint-5" / "trainer_state.json").unlink()
    assert last_checkpoint(str(out), None) is None


def checkpoint(out, step: int, optimizer: bool = True):
    (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    if optimizer:
        (out / f"checkpoint-{step}" / f"global_step{step}").mkdir()


def test_a_checkpoint_without_optimizer_state_is_refused_before_anything_loads(tmp_path):
    """save_only_model=true checkpoints hold trainer_state.json but no optimizer state; DeepSpeed would raise on
    every rank after the models loaded."""
    out = tmp_path / "out"
    checkpoint(out, 4)
    checkpoint(out, 8, optimizer=False)
    cfg = compose("tiny_teacher_sft", [f"output_dir={out}"])
    refused(check, cfg, 1, match=rf"output_dir={out}: checkpoint-8 holds no optimizer state \(saved with "
                                 rf"save_only_model=true\?\), so it cannot be resumed; give model_name_or_path="
                                 rf"{out / 'checkpoint-8'} to start a new run from its weights")


def test_resuming_an_older_checkpoint_beside_newer_ones_is_refused(tmp_path):
    """A branch from checkpoint-25 with checkpoint-50 still in output_dir: a later plain rerun would resume
    checkpoint-50 (the other branch), and the same command rerun would replay from 25."""
    out = tmp_path / "out"
    for step in (25, 50):
        checkpoint(out, step)
    cfg = compose("tiny_teacher_sft", [f"output_dir={out}", f"resume_from={out / 'checkpoint-25'}"])
    refused(check, cfg, 1, match=rf"resume_from={out / 'checkpoint-25'}: output_dir={out} holds newer checkpoints "
                                 r"\(checkpoint-50\); a later plain rerun would resume them")
    import shutil

    shutil.move(str(out / "checkpoint-50"), str(tmp_path / "checkpoint-50"))
    check(cfg, 1)
    cfg = compose("tiny_teacher_sft", [f"output_dir={out}", f"+resume_from_checkpoint={tmp_path / 'checkpoint-50'}"])
    assert check(cfg, 1)[0].run.resume_from == str(tmp_path / "checkpoint-50")   # trl's name for resume_from


def test_a_rerun_with_other_settings_does_not_silently_resume_the_old_run(tmp_path, caplog):
    from rlt.runs import save_composed_config

    out = tmp_path / "out"
    first = settings(tmp_path, "tiny_teacher_sft", "learning_rate=0.001")
    save_composed_config(first.composed, str(out), True)
    (out / "checkpoint-4" / "global_step4").mkdir(parents=True)  # DeepSpeed's optimizer state
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    same = compose("tiny_teacher_sft", [f"output_dir={out}", "learning_rate=0.001", "max_steps=50", "logging_steps=2"])
    check(same, 1)  # the same run, longer and logged more often: it resumes
    fits = compose("tiny_teacher_sft", [f"output_dir={out}", "learning_rate=0.001", "per_device_train_batch_size=2",
                                        "gradient_checkpointing=true", "attn_implementation=eager"])
    check(fits, 1)  # after an out-of-memory crash: the same batch in smaller pieces, recomputed activations
    # a key rlt gained after that run (absent from its rlt_config.yaml), left at its default: the same run
    from omegaconf import OmegaConf

    older = {k: v for k, v in first.composed.items() if k != "max_prompt_length"}
    OmegaConf.save(OmegaConf.create(older), out / "rlt_config.yaml")
    check(same, 1)
    refused(check, compose("tiny_teacher_sft", [f"output_dir={out}", "learning_rate=0.001", "max_prompt_length=99"]),
            1, match=r"made with other settings \(max_prompt_length: None -> 99\)")
    save_composed_config(first.composed, str(out), True)
    other = compose("tiny_teacher_sft", [f"output_dir={out}", "learning_rate=0.05", "model_name_or_path=rlt-tiny:5"])
    message = refused(check, other, 1, match=rf"output_dir={out} holds a run to resume \(checkpoint-4\) made with "
                                             r"other settings \(learning_rate: 0\.001 -> 0\.05; model_name_or_path: "
                                             r"'rlt-tiny:0' -> 'rlt-tiny:5'\); resuming would keep")
    assert message.endswith(f"or resume_from={out / 'checkpoint-4'} to resume it anyway")
    check(compose("tiny_teacher_sft", [f"output_dir={out}", "learning_rate=0.05",
                                        f"resume_from={out / 'checkpoint-4'}"]), 1)  # asked for: a warning only
    assert "resuming with settings that differ from that run's (learning_rate: 0.001 -> 0.05)" in caplog.text
    (out / "rlt_config.yaml").unlink()  # a run that left no settings: it resumes, and says it could not check
    check(other, 1)
    assert "resuming checkpoint-4 without checking its settings (the run left no rlt_config.yaml)" in caplog.text


def test_hub_ids_are_asked_for_and_tiny_specs_pass_check(tmp_path, monkeypatch):
    import huggingface_hub

    on_hub = {"Qwen/Qwen2.5-7B-Instruct"}  # no network here: the hub's answer is stood in for
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo, name, **k: repo in on_hub)
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'out'}", "model_name_or_path=Qwen/Qwen2.5-7B-Instruct"])
    assert check(cfg, 1)[0].model.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'out'}", "model_name_or_path=nobody/no-such-model"])
    refused(check, cfg, 1, match=r"model_name_or_path=nobody/no-such-model: not a local path, and no config\.json "
                                 r"for it on the hub or in its cache \(not on the hub\)")
    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path / 'out'}", "student_model=nobody/student"])
    refused(check, cfg, 1, match=r"student_model=nobody/student: not a local path")
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'out'}"])
    assert check(cfg, 1)[0].model.model_name_or_path == "rlt-tiny:0"


def test_launch_sh_refuses_a_missing_model_in_one_line(tmp_path):
    proc = run_cmd([str(ROOT / "launch.sh"), "1", "tiny_teacher_sft", f"output_dir={tmp_path / 'out'}",
                    f"model_name_or_path={tmp_path / 'nomodel'}"], timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("rlt.train: error: model_name_or_path=")
    # nothing was launched (the first-run notice about DeepSpeed's op may come before the check)
    assert "Traceback" not in proc.stderr and "process(es), recipe=" not in proc.stdout


def test_launch_sh_ignores_a_cluster_launchers_variables(tmp_path):
    """Inside a pod of a larger job (RANK=1, torchrun's PET_*), the check ran as a non-main rank and printed no
    error, and torchrun would have waited for the other nodes; launch.sh drops them and says so."""
    env = {"RANK": "1", "PET_NNODES": "2", "MASTER_PORT": "1"}
    proc = run_cmd([str(ROOT / "launch.sh"), "1", "tiny_teacher_sft", f"output_dir={tmp_path}", "bogus_key=1"],
                   timeout=300, check=False, env=env)
    assert proc.returncode == 2
    assert "[launch] a single-node run: ignoring the environment's MASTER_PORT PET_NNODES RANK" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("rlt.train: error: unknown key 'bogus_key'")


def test_launch_with_server_ignores_a_cluster_launchers_variables(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("PET_NNODES", "2")
    with pytest.raises(SystemExit) as e:
        launch_with_server.main(["1", "1", "tiny_teacher_rlt", f"output_dir={tmp_path}", "bogus_key=1"])
    assert e.value.code == 2
    assert "launch_with_server.sh: error: unknown key 'bogus_key'" in capsys.readouterr().err  # it was silent


# ----------------------------------------------------------------------------------------- 5, 6. launch_with_server
def test_launch_with_server_names_a_recipe_of_another_kind(tmp_path):
    refused(launch_with_server.validate, "tiny_teacher_sft", [f"output_dir={tmp_path}"], 1, 1,
            match=r"tiny_teacher_sft is not a teacher RL recipe \(trainer=sft\); use \./launch\.sh")


@pytest.mark.parametrize("counts, key", [(("1", "0"), "NUM_TRAIN"), (("0", "1"), "NUM_VLLM")])
def test_launch_with_server_counts_are_at_least_one(counts, key, capsys):
    with pytest.raises(SystemExit) as e:
        launch_with_server.main([*counts, "tiny_teacher_rlt"])
    assert e.value.code == 2
    assert f"launch_with_server.sh: error: {key} must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_more_training_processes_than_gpus_is_refused(monkeypatch):
    import rlt.models
    from rlt.train import check_gpus_for

    monkeypatch.setattr(rlt.models, "gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    refused(check_gpus_for, 8, match=r"NUM_PROCESSES=8: 4 GPU\(s\) visible \(CUDA_VISIBLE_DEVICES=0,1,2,3\); each "
                                     r"training process needs a GPU of its own")
    check_gpus_for(4)
    monkeypatch.setattr(rlt.models, "gpu_count", lambda: 0)  # CPU processes: any number
    check_gpus_for(8)


def test_zero_processes_is_not_unset(tmp_path):
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path}"])
    refused(build_train_settings, cfg, 0, match=r"number of training processes \(0\) must be >= 1")


# ----------------------------------------------------------------------------------------- 7. DeepSpeed flags
@pytest.mark.parametrize("flags, match", [
    (["offload", "zero1"], "launch.sh: error: offload and zero1 exclude each other: give at most one of offload|zero1"),
    (["ofload"], "launch.sh: error: unexpected argument 'ofload': give key=value overrides and at most one of "
                 "offload|zero1"),
])
def test_launch_sh_flags(tmp_path, flags, match):
    proc = run_cmd([str(ROOT / "launch.sh"), "1", "tiny_teacher_sft", f"output_dir={tmp_path}", *flags],
                   timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == match, proc.stderr


def test_launch_with_server_owns_the_server_keys(tmp_path):
    refused(launch_with_server.validate, "tiny_teacher_rlt", [f"output_dir={tmp_path}", "vllm_num_servers=3"], 1, 1,
            match=r"vllm_num_servers=3: launch_with_server\.sh starts NUM_VLLM=1 server\(s\) and sets "
                  r"vllm_num_servers itself")
    given = ["lr=1", "~vllm_port", "++vllm_num_servers=2", "+vllm_log_dir=x", "vllm_host=127.0.0.1", "~beta"]
    assert launch_with_server.trainer_overrides(given) == ["lr=1", "~beta"]


def test_launch_with_server_flags():
    refused(launch_with_server.split_flags, ["x=1", "offload", "zero1"], match="offload and zero1 exclude each other")
    refused(launch_with_server.split_flags, ["ofload"], match=r"unexpected argument 'ofload'.*offload\|zero1")
    assert launch_with_server.split_flags(["x=1", "zero1", "~y"]) == (["x=1", "~y"], ["zero1"])


def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    """The running run's main process holds output_dir/.rlt_run.lock; --check of a second launch is refused in one
    line (without a running run, --check creates no lock file)."""
    from rlt.runs import RUN_LOCK, run_lock

    out = tmp_path / "out"
    cfg = compose("tiny_teacher_sft", [f"output_dir={out}"])
    check(cfg, 1)
    assert not (out / RUN_LOCK).exists()
    held = run_lock(str(out), hold=True)   # a run in progress
    refused(check, cfg, 1, match=rf"output_dir={out}: another training run is using it \(it holds "
                                 rf"{out / RUN_LOCK}\); wait for it to end")
    held.close()                            # it ended
    check(cfg, 1)


def test_a_running_run_holds_its_output_dir(tmp_path, monkeypatch):
    """rlt.train's main process holds the lock while its trainer runs (here the trainer only asks whether a
    second launch would be refused), and lets it go when the run ends."""
    import rlt.train
    from rlt.trainers import sft

    out = tmp_path / "out"
    cfg = compose("tiny_teacher_sft", [f"output_dir={out}"])
    seen = []

    def trainer(s, examples, fmt):
        with pytest.raises(ConfigError, match="another training run is using it"):
            check(cfg, 1)
        seen.append(True)

    monkeypatch.setattr(sft, "run_sft", trainer)
    rlt.train.run(cfg)
    assert seen == [True]
    import gc

    gc.collect()
    check(cfg, 1)   # the run is over: free again


def test_a_filesystem_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from rlt.runs import run_lock

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        assert run_lock(str(tmp_path), hold=True) is None
    assert "cannot be locked on this filesystem (No locks available)" in caplog.text


def test_gpus_torch_cannot_use_are_refused_not_run_on_cpu(tmp_path, monkeypatch):
    """A machine with NVIDIA device nodes whose torch cannot use CUDA (here: this CPU build) would have trained on
    CPU processes without a word; hiding the GPUs on purpose still runs on the CPU."""
    import torch

    import rlt.models

    (tmp_path / "nvidia0").write_text("")
    monkeypatch.setattr(rlt.models, "NVIDIA_DEVICES", str(tmp_path / "nvidia[0-9]*"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # as a CPU build of torch (on a GPU machine too)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = compose("tiny_teacher_sft", [f"output_dir={tmp_path / 'out'}"])
    refused(check, cfg, 1, match=r"^this machine has NVIDIA GPUs \(\S+nvidia0\) but torch cannot use them: this "
                                 r"torch \(\S+\) is a CPU build; fix the install .* set CUDA_VISIBLE_DEVICES= \(empty\)")
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        check(cfg, 1)


def test_launch_with_server_puts_the_group_ports_after_the_server_ports(tmp_path):
    """trl's fixed group port made a second run on the node (another vllm_port, as the port error says) crash at
    its first NCCL weight sync; unless given, the group ports now follow the run's own server ports."""
    s, _, _ = launch_with_server.validate("tiny_teacher_rlt", [f"output_dir={tmp_path}", "vllm_port=9100"], 2, 1)
    assert (s.rollout.vllm_port, s.args.vllm_group_port) == (9100, 9102)
    s, _, _ = launch_with_server.validate("tiny_teacher_rlt", [f"output_dir={tmp_path}", "+vllm_group_port=40000"], 1, 1)
    assert s.args.vllm_group_port == 40000
    assert launch_with_server.trainer_overrides(["+vllm_group_port=40000", "x=1"]) == ["x=1"]  # the launcher sets it


def test_local_servers_are_for_the_offline_tools(tmp_path):
    cfg = compose("tiny_teacher_rlt", [f"output_dir={tmp_path}", "vllm_local_servers=2"])
    refused(check, cfg, 1, match=r"^vllm_local_servers=2 is for rlt\.distill and rlt\.eval; training starts its "
                                 r"servers with \./launch_with_server\.sh")


def test_a_group_port_the_recipe_gives_is_kept_and_a_bad_one_refused(tmp_path):
    recipe = tmp_path / "rl.yaml"
    recipe.write_text("# @package _global_\ndefaults:\n  - /run_cfg/tiny_teacher_rlt\n  - _self_\n"
                      "vllm_group_port: 41000\n")
    s, _, _ = launch_with_server.validate(str(recipe), [f"output_dir={tmp_path / 'o'}"], 2, 1)
    assert s.args.vllm_group_port == 41000
    check = launch_with_server.check_group_ports   # with NCCL sync (CUDA): before any server starts
    check(9000, 65534, 2)   # 65534 and 65535
    refused(check, 65533, 65535, 2, match=r"vllm_group_port=65535: the NCCL group ports vllm_group_port \+ i "
                                          r"\(i < 2\) must lie in 1\.\.65535")
    refused(check, 8765, 8766, 2, match=r"vllm_group_port=8766 overlaps the server ports vllm_port=8765 \+ i")
    check(8765, 8767, 2)

"""Tiny teacher RL through launch.sh on 2 CPU processes (DeepSpeed ZeRO-3), and resume."""
import json
import re

from conftest import run_cmd
import pytest

pytestmark = pytest.mark.slow  # launches, servers or model-loading command lines

CMD = ["./launch.sh", "2", "cfgs/run_cfg/tiny_teacher_rlt.yaml"]


def step_logs(text):
    return [line for line in text.splitlines() if "'teacher_reward/r_ss'" in line]


def test_rl_run_logs_reward_components_and_saves(tmp_path):
    out = tmp_path / "r"
    proc = run_cmd(CMD + [f"output_dir={out}", "max_steps=3", "offload_untrained_models=true"])
    logs = step_logs(proc.stdout + proc.stderr)
    assert len(logs) == 3
    for what in ("student", "reference model"):   # on CPU the shards are there already; on a GPU: "moved from cuda"
        assert f"offload_untrained_models: {what}: its ZeRO-3 shards are already in CPU memory" in proc.stdout + proc.stderr
    for key in ("teacher_reward/r_kl", "teacher_reward/match_penalty", "teacher_reward/no_end_tag_frac",
                "teacher_reward/thought_kl/mean", "teacher_reward/solution_log_prob/min", "'kl'",
                "completions/mean_length", "time/generation", "time/reward", "time/update"):
        assert all(key in line for line in logs), key
    for step in (2, 3):   # save_total_limit: 2 keeps the newest two checkpoints
        assert (out / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert not (out / "checkpoint-1").exists()
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "teacher_chats" / "log.txt").read_text().count("===== step") > 0
    stored = [json.loads(line) for f in (out / "stored_completions").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert stored and all("r_ss" in row["reward_components"] for row in stored)


def test_crash_after_first_checkpoint_then_resume(tmp_path):
    """ZeRO-3 over 2 processes: the resume continues at step 2 and restores the reference model that step 1's
    sync_ref_model mix left (rlt saves it in the checkpoint; trl does not)."""
    from safetensors.torch import load_file
    import torch

    out = tmp_path / "r"
    cmd = CMD + [f"output_dir={out}", "max_steps=3", "ref_model_sync_steps=1"]
    crashed = run_cmd(cmd, env={"RLT_INJECT_CRASH_AFTER_STEP": "1"}, check=False)
    assert crashed.returncode != 0
    assert (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()
    assert re.search(r"reference model saved to .*checkpoint-1/reference_model/model.safetensors in [0-9.]+s",
                     crashed.stdout + crashed.stderr)
    ref1 = load_file(out / "checkpoint-1" / "reference_model" / "model.safetensors")   # checkpoint-1 is rotated away later
    resumed = run_cmd(cmd)
    text = resumed.stdout + resumed.stderr
    assert re.search(r"resuming from .*checkpoint-1", text)
    assert re.search(r"reference model restored from .*checkpoint-1/reference_model/model.safetensors \(step 1\)", text)
    assert len(step_logs(text)) == 2  # steps 2 and 3 only
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "model.safetensors").exists()
    ref2 = load_file(out / "checkpoint-2" / "reference_model" / "model.safetensors")
    policy2 = load_file(out / "checkpoint-2" / "model.safetensors")
    # trl's mix at the end of step 2, ref <- 0.1 ref + 0.9 policy, started from the restored reference
    assert set(ref2) == set(ref1) and all(
        torch.allclose(v, ref1[k].clone().mul_(0.1).add_(policy2[k], alpha=0.9), rtol=0, atol=1e-7)
        for k, v in ref2.items())

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
    out = tmp_path / "r"
    crashed = run_cmd(CMD + [f"output_dir={out}", "max_steps=3"], env={"RLT_INJECT_CRASH_AFTER_STEP": "1"},
                      check=False)
    assert crashed.returncode != 0
    assert (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()
    resumed = run_cmd(CMD + [f"output_dir={out}", "max_steps=3"])
    text = resumed.stdout + resumed.stderr
    assert re.search(r"resuming from .*checkpoint-1", text)
    assert len(step_logs(text)) == 2  # steps 2 and 3 only
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "model.safetensors").exists()

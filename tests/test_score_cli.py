"""python -m rlt.score on Countdown rows with two tiny models."""
import json
import sys

from conftest import run_cmd
from rlt.data import countdown


def write_input(path, n=6, bad_line=None):
    rows = countdown.generate_rows(n, seed=4)
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            if bad_line is not None and i + 1 == bad_line:
                f.write(json.dumps({"question": r["question"], "completion": "x"}) + "\n")  # no solution
                continue
            comp = r["reasoning_trace"][2:] + ("<|end_of_explanation|>" if i % 2 == 0 else "")
            f.write(json.dumps({"question": r["question"], "solution": r["solution"], "completion": comp}) + "\n")
    return rows


def score(tmp_path, *extra, check=True):
    return run_cmd([sys.executable, "-m", "rlt.score", "teacher=rlt-tiny:0", "student=rlt-tiny:1",
                    f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'out.jsonl'}", *extra], check=check)


def test_score_cli_writes_rewards(tmp_path):
    write_input(tmp_path / "in.jsonl")
    score(tmp_path, "kl_penalty_reward_coeff=[0,0]")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 6
    for i, row in enumerate(out):
        c = row["reward_components"]
        assert row["reward"] == c["reward"]
        assert c["r_kl"] == 0.0  # the override reached the reward
        assert c["match_penalty"] == (0.0 if i % 2 == 0 else -1.0)
        assert abs(row["reward"] - (c["r_ss"] - c["r_kl"] + c["match_penalty"])) < 1e-5
        assert c["solution_tokens"] > 10 and c["thought_tokens"] > 10


def test_bad_row_stops_before_writing(tmp_path):
    write_input(tmp_path / "in.jsonl", bad_line=3)
    proc = score(tmp_path, check=False)
    assert proc.returncode != 0
    assert "in.jsonl, line 3: missing or non-string field(s) ['solution']" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
    score(tmp_path, "skip_bad_rows=true")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


def test_unknown_key_and_missing_args(tmp_path):
    write_input(tmp_path / "in.jsonl", n=1)
    proc = score(tmp_path, "kl_penalty_coef=[0,0]", check=False)
    assert proc.returncode != 0 and "kl_penalty_coef" in proc.stderr
    proc = run_cmd([sys.executable, "-m", "rlt.score", "teacher=rlt-tiny:0"], check=False)
    assert "missing required argument(s) student=..., input=..., output=..." in proc.stderr

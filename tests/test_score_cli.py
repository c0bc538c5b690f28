"""python -m rlt.score on Countdown rows with two tiny models."""
import json
import sys

import pytest

from conftest import run_cmd
from rlt.data import countdown

pytestmark = pytest.mark.slow  # launches, servers or model-loading command lines


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
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rlt.score: error: {tmp_path / 'in.jsonl'}, line 3: missing or non-text field(s) ['solution'] "
        "(skip_bad_rows=true skips such rows)")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
    score(tmp_path, "skip_bad_rows=true")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("line,msg", [
    (b'{"question": "q", "solution": "s", "completion": "\xff\xfe"}', "line 2: not valid UTF-8"),
    (b'["question", "solution"]', "line 2: a JSON list, not an object"),
    (b'{"question": "q", "solution": "s", ', "line 2: not valid JSON"),
    (b'{"question": "q", "solution": "  ", "completion": "x"}', "line 2: empty solution"),
])
def test_malformed_rows_give_one_line(tmp_path, line, msg):
    rows = countdown.generate_rows(2, seed=4)
    good = json.dumps({"question": rows[0]["question"], "solution": rows[0]["solution"], "completion": "x"}).encode()
    (tmp_path / "in.jsonl").write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    proc = score(tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rlt.score: error: {tmp_path / 'in.jsonl'}, {msg}"), last
    assert not (tmp_path / "out.jsonl").exists()
    score(tmp_path, "skip_bad_rows=true")  # the bad line is skipped, the two good ones are scored
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_unwritable_output_is_found_before_any_model_loads(tmp_path):
    # under a regular file no directory can be made, for root too; a teacher that resolves nowhere (offline)
    # would be the error instead if any model were looked up first
    write_input(tmp_path / "in.jsonl", n=1)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub" / "out.jsonl"
    proc = run_cmd([sys.executable, "-m", "rlt.score", "teacher=nosuchorg/never-resolved", "student=rlt-tiny:1",
                    f"input={tmp_path / 'in.jsonl'}", f"output={out}"], check=False, env={"HF_HUB_OFFLINE": "1"})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.endswith("cannot write there (Not a directory)"), last
    assert "nosuchorg" not in last and not out.exists()


def test_unknown_key_missing_args_and_help(tmp_path):
    write_input(tmp_path / "in.jsonl", n=1)
    proc = score(tmp_path, "kl_penalty_coef=[0,0]", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("rlt.score: error: unknown key 'kl_penalty_coef': not a setting "
                                                    "of rlt.score (python -m rlt.score --help lists every key)")
    proc = run_cmd([sys.executable, "-m", "rlt.score", "teacher=rlt-tiny:0"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("input=... is required")
    out = run_cmd([sys.executable, "-m", "rlt.score", "--help"]).stdout
    for key in ("input=None", "teacher_temperature=0.7", "kl_penalty_reward_coeff=[3.0, 0.03]", "student_model=None",
                "(also: student)", "data_format='auto'"):
        assert key in out, key


def test_device_is_checked_before_any_model_loads(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device=cuda is valid here")
    write_input(tmp_path / "in.jsonl", n=1)
    proc = run_cmd([sys.executable, "-m", "rlt.score", "teacher=nosuchorg/never-resolved", "student=rlt-tiny:1",
                    f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'out.jsonl'}", "device=cuda"],
                   check=False, env={"HF_HUB_OFFLINE": "1"})   # a model looked up first would be the error instead
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "rlt.score: error: device=cuda: torch sees 0 GPU(s) here; choose cpu, auto")
    proc = score(tmp_path, "device=cpu", "reward_logprob_backend=fused", check=False)
    assert proc.returncode == 2 and "reward_logprob_backend=fused runs on CUDA" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.jsonl").exists()


def score_in_process(tmp_path, *extra):
    from rlt.config import compose_tool
    from rlt.data.config import FormatConfig
    from rlt.models import ModelConfig
    from rlt.rewards.config import RewardConfig
    from rlt.score import ScoreConfig, score as run_score

    concerns = (ScoreConfig, ModelConfig, FormatConfig, RewardConfig)
    objs = compose_tool("rlt.score", ScoreConfig, concerns[1:],
                        ["teacher=rlt-tiny:0", "student=rlt-tiny:1", f"input={tmp_path / 'in.jsonl'}",
                         f"output={tmp_path / 'out.jsonl'}", "batch_size=2", *extra])
    return run_score(*(objs[c] for c in concerns))


def test_a_stopped_run_keeps_its_scored_batches_and_the_rerun_goes_on(tmp_path, monkeypatch):
    """Batches are appended as they are scored; a rerun scores only the rest; other settings are refused."""
    import torch

    import rlt.rewards.teacher_reward as tr
    from rlt.errors import ConfigError

    write_input(tmp_path / "in.jsonl", n=6)
    scored = []

    class FakeScorer:  # reward = length of the completion; fails on the batch given in `fail_at`
        fail_at = 2

        def __call__(self, items):
            scored.append(len(items))
            if len(scored) == self.fail_at:
                raise RuntimeError("CUDA out of memory (injected)")
            r = torch.tensor([float(len(it.completion)) for it in items])
            return type("R", (), {"rewards": r, "components": {"reward": r}})()

    monkeypatch.setattr(tr, "load_scorer", lambda *a, **k: FakeScorer())
    with pytest.raises(RuntimeError, match="injected"):
        score_in_process(tmp_path)
    partial = tmp_path / "out.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 2 and not (tmp_path / "out.jsonl").exists()
    with open(partial, "a") as f:
        f.write('{"question": "torn')  # a write cut off mid-line
    with pytest.raises(ConfigError, match=r"out\.jsonl\.partial: scored with other settings "
                                          r"\(reward differ\); delete it"):
        score_in_process(tmp_path, "kl_penalty_reward_coeff=[0,0]")
    FakeScorer.fail_at = 0
    scored.clear()
    assert score_in_process(tmp_path) == 6
    assert scored == [2, 2]  # only the four rows not scored before
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    inputs = [json.loads(line) for line in (tmp_path / "in.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in out] == [r["completion"] for r in inputs]
    assert [r["reward"] for r in out] == [float(len(r["completion"])) for r in inputs]
    assert not partial.exists() and not (tmp_path / "out.jsonl.partial.json").exists()

    FakeScorer.fail_at = 2  # a partial file whose rows are not the input's is refused
    scored.clear()
    with pytest.raises(RuntimeError, match="injected"):
        score_in_process(tmp_path)
    first, second = partial.read_text().splitlines()
    partial.write_text(json.dumps({**json.loads(first), "question": "another question"}) + "\n" + second + "\n")
    with pytest.raises(ConfigError, match=r"out\.jsonl\.partial, line 1: not the same row as the input's row 1 "):
        score_in_process(tmp_path)

"""Bad input to rlt.eval, rlt.distill and rlt.score: one line naming the key, file or line, before anything loads."""
import json
import logging
import sys

import pytest

from conftest import run_cmd
from rlt.cli import check_writable_file
from rlt.config import compose_tool
from rlt.data.config import DataConfig, FormatConfig
from rlt.distill import DistillConfig, distill
from rlt.errors import ConfigError
from rlt.eval import EvalConfig, run_eval
from rlt.generation.config import RolloutConfig
from rlt.models import ModelConfig, resolve_model_path
from rlt.rewards.config import RewardConfig
from rlt.score import ScoreConfig, score

DISTILL_CONCERNS = (ModelConfig, DataConfig, FormatConfig, RewardConfig, RolloutConfig)
EVAL_CONCERNS = (ModelConfig, DataConfig, FormatConfig, RolloutConfig)
SCORE_CONCERNS = (ModelConfig, FormatConfig, RewardConfig)
E1 = "<|end_of_explanation|>"


def tool_args(prog, cls, concerns, **kw):
    """The typed settings of ``python -m PROG k=v ...``, in the order its run function takes them."""
    objs = compose_tool(prog, cls, concerns, [f"{k}={v}" for k, v in kw.items()])
    return [objs[cls]] + [objs[c] for c in concerns]


def distill_args(**kw):
    return tool_args("rlt.distill", DistillConfig, DISTILL_CONCERNS, **kw)


class FakeEngine:
    """Returns fixed completion ids; records the prompts it was asked for."""

    def __init__(self, tok):
        self.ids = tok("Add them.\n\n" + E1, add_special_tokens=False)["input_ids"]
        self.prompt_ids = []

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p=1.0, seed=None):
        self.prompt_ids += prompt_ids
        return [[self.ids] * n for _ in prompt_ids]


# ------------------------------------------------------------------ 1: greedy decoding with several samples
def test_greedy_sampling_with_several_samples_is_refused_in_the_config():
    with pytest.raises(ConfigError, match=r"^n_samples=2 with temperature=0: greedy decoding gives one answer per "
                                          r"prompt; set n_samples=1 or temperature > 0$"):
        EvalConfig(output_dir="d", n_samples=2)
    with pytest.raises(ConfigError, match=r"^num_explanations=4 with temperature=0: .* set num_explanations=1 or "
                                          r"temperature > 0$"):
        DistillConfig(output="o.jsonl", temperature=0.0)
    EvalConfig(output_dir="d", n_samples=2, temperature=0.7)  # sampling: fine
    EvalConfig(output_dir="d", n_samples=1)                    # greedy, one answer: fine
    DistillConfig(output="o.jsonl", temperature=0.0, num_explanations=1)


def test_eval_cli_refuses_greedy_with_several_samples_in_one_line(tmp_path):
    proc = run_cmd([sys.executable, "-m", "rlt.eval", "model=rlt-tiny:0", "dataset=rlt-countdown:4:0",
                    f"output_dir={tmp_path / 'ev'}", "n_samples=2", "max_completion_length=16"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("rlt.eval: error: n_samples=2 with temperature=0")
    assert not (tmp_path / "ev").exists()


# ------------------------------------------------------------------ 2: an output that is a directory
def test_check_writable_file_refuses_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"^output={tmp_path} is a directory: give a file path$"):
        check_writable_file(tmp_path)
    check_writable_file(tmp_path / "new" / "o.jsonl")  # its directory is created
    assert (tmp_path / "new").is_dir()


def test_score_refuses_a_directory_output_before_any_model_loads(tmp_path):
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "outdir").mkdir()
    args = tool_args("rlt.score", ScoreConfig, SCORE_CONCERNS, teacher="nosuchorg/never-resolved", student="x",
                     input=tmp_path / "in.jsonl", output=tmp_path / "outdir", device="cpu")
    with pytest.raises(ConfigError, match=rf"^output={tmp_path / 'outdir'} is a directory"):
        score(*args)


def test_distill_refuses_a_directory_output_before_any_model_loads(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ConfigError, match=rf"^output={tmp_path / 'dir.jsonl'} is a directory"):
        distill(*distill_args(teacher="nosuchorg/never-resolved", dataset="y", output=tmp_path / "dir.jsonl"))
    (tmp_path / "d.summary.json").mkdir()
    with pytest.raises(ConfigError, match=r"d.summary.json, written there, is a directory"):
        distill(*distill_args(teacher="nosuchorg/never-resolved", dataset="y", output=tmp_path / "d.jsonl"))


def test_eval_refuses_a_directory_where_its_results_go(tmp_path):
    (tmp_path / "ev" / "results.jsonl").mkdir(parents=True)
    args = tool_args("rlt.eval", EvalConfig, EVAL_CONCERNS, model="nosuchorg/never-resolved", dataset="y",
                     output_dir=tmp_path / "ev")
    with pytest.raises(ConfigError, match=r"^output_dir=.*/ev: .*/ev/results.jsonl, written there, is a directory"):
        run_eval(*args)


# ------------------------------------------------------------------ 3: a model that is not a loadable model
def test_a_directory_without_config_json_is_not_a_model(tmp_path, tiny_path):
    with pytest.raises(ConfigError, match=rf"^student={tmp_path} has no config.json, so it is not a model: give a "
                                          r"checkpoint directory \(with config.json\), a hub id or rlt-tiny:SEED$"):
        resolve_model_path(str(tmp_path), "student")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^teacher=.*w.bin is a file, not a model directory"):
        resolve_model_path(str(tmp_path / "w.bin"), "teacher")
    with pytest.raises(ConfigError, match=r"^model path .* has no config.json"):  # without a key (older callers)
        resolve_model_path(str(tmp_path))
    assert resolve_model_path(tiny_path, "teacher") == tiny_path
    assert resolve_model_path("rlt-tiny:0", "teacher") == tiny_path


def test_a_hub_id_that_cannot_be_fetched_names_the_key(monkeypatch, tmp_path):
    import time

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: the hub is asked
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^teacher=nosuchorg/nosuchmodel: not a local path, and no config.json "
                                          r"for it on the hub or in its cache \((ConnectError|not on the hub)\)"):
        resolve_model_path("nosuchorg/nosuchmodel", "teacher")  # no network here: one try, no retries
    assert time.monotonic() - start < 10
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo_id, filename: False)
    with pytest.raises(ConfigError, match=r"\(not on the hub\)"):
        resolve_model_path("nosuchorg/nosuchmodel", "teacher")
    assert resolve_model_path("nosuchorg/nosuchmodel") == "nosuchorg/nosuchmodel"  # no key: no hub call
    cached = tmp_path / "models--someorg--cached" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (tmp_path / "models--someorg--cached" / "refs").mkdir()
    (tmp_path / "models--someorg--cached" / "refs" / "main").write_text("abc")
    assert resolve_model_path("someorg/cached", "teacher") == "someorg/cached"  # in the cache: the hub is not asked


def test_score_cli_refuses_unloadable_models_in_one_line(tmp_path):
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "emptydir").mkdir()
    base = [sys.executable, "-m", "rlt.score", f"input={tmp_path / 'in.jsonl'}", f"output={tmp_path / 'o.jsonl'}"]
    proc = run_cmd([*base, "teacher=nosuchorg/nosuchmodel", f"student={tmp_path / 'emptydir'}"], check=False,
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "rlt.score: error: teacher=nosuchorg/nosuchmodel: not a local path, and no config.json")
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------ 4: resuming from rows of other data
def test_distill_refuses_to_resume_from_rows_of_other_questions(tmp_path, tokenizer, tiny_path):
    out = tmp_path / "d.jsonl"
    distill(*distill_args(teacher=tiny_path, dataset="rlt-countdown:4:3", output=out, num_explanations=2),
            engine=FakeEngine(tokenizer))
    before = out.read_bytes() + b'{"torn'  # a torn last line is not repaired either
    out.write_bytes(before)
    engine = FakeEngine(tokenizer)
    with pytest.raises(ConfigError, match=rf"^{out}: its rows were written with other settings \(data differ\)"):
        distill(*distill_args(teacher=tiny_path, dataset="rlt-countdown:4:5", output=out, num_explanations=2),
                engine=engine)
    assert out.read_bytes() == before and not engine.prompt_ids
    (tmp_path / "d.jsonl.settings.json").unlink()   # a file without its settings: each row's question is checked
    with pytest.raises(ConfigError, match=rf"^{out}, line 1: its question is not question 0 \(source_index\) of the "
                                          r"dataset, so this file was written from other data"):
        distill(*distill_args(teacher=tiny_path, dataset="rlt-countdown:4:5", output=out, num_explanations=2),
                engine=engine)
    assert out.read_bytes() == before and not engine.prompt_ids


def test_distill_summary_describes_the_whole_file(tmp_path, tokenizer, tiny_path):
    out = tmp_path / "d.jsonl"
    base = dict(teacher=tiny_path, dataset="rlt-countdown:4:3", output=out, num_explanations=2)
    distill(*distill_args(**base, max_samples=3), engine=FakeEngine(tokenizer))
    distill(*distill_args(**base), engine=FakeEngine(tokenizer))  # the 4th question
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert (summary["rows"], summary["questions"], summary["explanations"]) == (8, 4, 8)
    assert summary["last_call"]["rows"] == 2
    distill(*distill_args(**base), engine=FakeEngine(tokenizer))  # nothing to do: the counts stay
    again = json.loads(out.with_suffix(".summary.json").read_text())
    assert (again["rows"], again["questions"], again["explanations"]) == (8, 4, 8)
    assert again["last_call"]["rows"] == 0


# ------------------------------------------------------------------ 5: prompts longer than max_prompt_length
def test_distill_drops_prompts_longer_than_max_prompt_length(tmp_path, tokenizer, tiny_path, caplog, monkeypatch):
    import rlt.generation.offline as offline

    seen = {}

    def fake_make_engine(model, rollout, max_model_len, seed, dtype, longest_prompt=None, log_dir=None):
        seen["longest"] = longest_prompt
        return engine

    engine = FakeEngine(tokenizer)
    monkeypatch.setattr(offline, "make_engine", fake_make_engine)
    base = dict(teacher=tiny_path, dataset="rlt-countdown:8:3", num_explanations=1)
    distill(*distill_args(**base, output=tmp_path / "all.jsonl"))
    lengths = sorted(len(p) for p in engine.prompt_ids)
    limit = lengths[3]
    engine.prompt_ids = []
    with caplog.at_level(logging.WARNING):
        distill(*distill_args(**base, output=tmp_path / "d.jsonl", max_prompt_length=limit))
    kept = sum(n <= limit for n in lengths)
    assert len(engine.prompt_ids) == kept and max(map(len, engine.prompt_ids)) <= limit
    assert seen["longest"] == max(map(len, engine.prompt_ids))
    assert f"dropped {8 - kept} of 8 prompts longer than max_prompt_length={limit} tokens" in caplog.text
    with pytest.raises(ConfigError, match=r"^no prompt fits max_prompt_length=1 tokens; raise max_prompt_length$"):
        distill(*distill_args(**base, output=tmp_path / "none.jsonl", max_prompt_length=1))


def test_eval_drops_prompts_longer_than_max_prompt_length_before_the_engine(tmp_path, tokenizer, tiny_path,
                                                                             monkeypatch):
    import rlt.generation.offline as offline

    seen = {}

    def fake_make_engine(model, rollout, max_model_len, seed, dtype, longest_prompt=None, log_dir=None):
        seen["longest"] = longest_prompt
        return FakeEngine(tokenizer)

    monkeypatch.setattr(offline, "make_engine", fake_make_engine)
    base = dict(model=tiny_path, dataset="rlt-countdown:6:3", max_completion_length=8)
    all_ = run_eval(*tool_args("rlt.eval", EvalConfig, EVAL_CONCERNS, **base, output_dir=tmp_path / "a"))
    assert all_["questions"] == 6
    longest = seen["longest"]
    with pytest.raises(ConfigError, match=r"^no prompt fits max_prompt_length=1 tokens; raise max_prompt_length$"):
        run_eval(*tool_args("rlt.eval", EvalConfig, EVAL_CONCERNS, **base, output_dir=tmp_path / "b",
                            max_prompt_length=1))
    some = run_eval(*tool_args("rlt.eval", EvalConfig, EVAL_CONCERNS, **base, output_dir=tmp_path / "c",
                               max_prompt_length=longest - 1))
    assert some["questions"] < 6 and seen["longest"] <= longest - 1


def test_clamp_refuses_a_longest_prompt_that_does_not_fit_the_context(tiny_path, monkeypatch):
    import rlt.generation.offline as offline

    calls = []
    monkeypatch.setattr(offline, "OfflineEngine", lambda model, max_model_len, **kw: calls.append(max_model_len))
    with pytest.raises(ConfigError, match=r"longest prompt has 9000 tokens .* lower max_prompt_length"):
        offline.make_engine(tiny_path, RolloutConfig(), 9000 + 16384, 0, "auto", longest_prompt=9000)
    assert not calls


# ------------------------------------------------------------------ 6: range errors name only the wrong key
@pytest.mark.parametrize("make,msg", [
    (lambda: EvalConfig(output_dir="d", n_samples=0), "n_samples=0 must be >= 1"),
    (lambda: EvalConfig(output_dir="d", max_completion_length=0), "max_completion_length=0 must be >= 1"),
    (lambda: EvalConfig(output_dir="d", temperature=-1.0), "temperature=-1.0 must be >= 0 (0: greedy)"),
    (lambda: EvalConfig(output_dir="d", top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (lambda: DistillConfig(output="o.jsonl", temperature=-1.0), "temperature=-1.0 must be >= 0 (0: greedy)"),
    (lambda: DistillConfig(output="o.jsonl", top_p=2.0), "top_p=2.0 must be in (0, 1]"),
    (lambda: ScoreConfig(input="i", output="o", batch_size=0), "batch_size=0 must be >= 1"),
    (lambda: ScoreConfig(input="i", output="o", teacher_temperature=0.0), "teacher_temperature=0.0 must be > 0"),
])
def test_range_errors_name_only_the_wrong_key(make, msg):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value) == msg


def test_tool_keys_an_alias_twice_and_training_keys_are_one_clear_line():
    compose = lambda *argv: compose_tool("rlt.score", ScoreConfig, SCORE_CONCERNS, list(argv))  # noqa: E731
    with pytest.raises(ConfigError, match=r"^both 'teacher' and 'model_name_or_path' are given, and both set "
                                          r"'model_name_or_path'; keep one$"):
        compose("teacher=a/b", "model_name_or_path=c/d", "input=x", "output=y")
    with pytest.raises(ConfigError, match=r"^unknown key 'learning_rate': not a setting of rlt\.score "
                                          r"\(python -m rlt\.score --help lists every key\)$"):
        compose("+learning_rate=1e-5", "input=x", "output=y")  # no hint to add it with +, which is what was done
    objs = compose("teacher=a/b", "student=c/d", "student=e/f", "input=x", "output=y")  # one name twice: the last
    assert objs[RewardConfig].student_model == "e/f"


@pytest.mark.parametrize("failing", ["1", "0,1"])
def test_a_user_error_on_another_rank_reaches_torchruns_summary(tmp_path, failing):
    """Rank 0 writes the one line; another rank's error goes to torchrun's failure summary (it was silent)."""
    script = tmp_path / "fail.py"
    script.write_text("import os\nfrom rlt.cli import user_errors\nfrom rlt.errors import ConfigError\n"
                      "with user_errors('prog'):\n"
                      f"    if os.environ['RANK'] in {failing.split(',')!r}:\n"
                      "        raise ConfigError(f\"row 3: seen by rank {os.environ['RANK']}\")\n")
    r = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)], check=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "exitcode  : 2" in out
    if failing == "1":
        assert "ConfigError: row 3: seen by rank 1" in out and "prog: error:" not in out
    else:
        assert out.count("prog: error: row 3: seen by rank 0\n") == 1


def test_a_user_error_under_an_inherited_rank_without_torchrun_is_printed(monkeypatch, capsys):
    """RANK=1 left in the environment by a cluster's job (no torchrun to report it) printed nothing."""
    from rlt.cli import user_errors

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as e, user_errors("rlt.eval"):
        raise ConfigError("dataset=x.jsonl: no such file")
    assert e.value.code == 2 and capsys.readouterr().err == "rlt.eval: error: dataset=x.jsonl: no such file\n"

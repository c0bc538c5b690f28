"""The micro-scale RLT experiment: its statistics against hand-computed numbers, the embedded running-sum task,
the run's plan, and (slow) scripts/experiment.sh --quick end to end."""
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlt.data import arithmetic
from rlt import stats
from conftest import ROOT

# ----------------------------------------------------------------------------------------- statistics


def test_mean_se_and_t_interval_by_hand():
    # values 0.5, 0.6, 0.7: mean 0.6, sd 0.1, se 0.1 / sqrt(3) = 0.0577350; t(0.975, df 2) = 4.302653
    m, se = stats.mean_se([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and se == pytest.approx(0.1 / math.sqrt(3))
    ci = stats.mean_ci95([0.5, 0.6, 0.7])
    assert ci["mean"] == pytest.approx(0.6) and ci["ci95"] == pytest.approx(4.302653 * 0.0577350, rel=1e-5)
    assert ci["ci95"] == pytest.approx(0.248414, abs=1e-6)
    one = stats.mean_ci95([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["ci95"])


@pytest.mark.parametrize("df, want", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (10, 2.228139), (30, 2.042272)])
def test_t_quantile_matches_tables(df, want):
    assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=2e-6)
    assert stats.t_quantile(0.025, df) == pytest.approx(-want, abs=2e-6)


def test_rise_z_by_hand():
    # first window 1, 2, 3 (mean 2, se 1/sqrt(3)); last 4, 5, 6 (mean 5, same se):
    # z = 3 / sqrt(2/3) = 3.674235
    r = stats.rise_z([1, 2, 3], [4, 5, 6])
    assert (r["first_mean"], r["last_mean"]) == (2, 5)
    assert r["first_se"] == pytest.approx(1 / math.sqrt(3)) and r["z"] == pytest.approx(3.674235, abs=1e-6)
    # Welch-Satterthwaite: (2/3)^2 / ((1/3)^2/2 + (1/3)^2/2) = 4 degrees of freedom; t(0.975, 4) = 2.776445
    assert r["df"] == pytest.approx(4) and r["crit"] == pytest.approx(2.776445, abs=1e-5)
    assert stats.rise_z([3, 2, 1], [1, 2, 3])["z"] == 0
    assert math.isnan(stats.rise_z([1], [2])["z"])  # no standard error from one step
    assert math.isnan(stats.rise_z([1], [2])["crit"])


def verdict_of(z, crit, diffs):
    from rlt.experiment.report import verdict

    s = {"reward_rise_z": z, "reward_rise_crit": crit, "reward_rise_df": 4.0,
         "acc_paired_differences": {k: diffs for k in ("rlt_minus_raw", "rlt_minus_warmup", "warmup_minus_raw")}}
    return verdict(s)


def test_verdict_reads_the_rise_against_welchs_bound_in_both_directions():
    diffs = {"mean": 0.05, "ci95": 0.02}
    assert "raised the teacher reward (z = 3.00; Welch's t, 4.0 degrees of freedom: 95% bound 2.78)" in \
        verdict_of(3.0, 2.776, diffs)[0]
    assert "did not clearly change the teacher reward (z = 2.50, within ±2.78: noise" in verdict_of(2.5, 2.776, diffs)[0]
    assert "lowered the teacher reward (z = -6.00" in verdict_of(-6.0, 2.776, diffs)[0]   # a drop is not noise
    assert "undetermined" in verdict_of(float("nan"), float("nan"), diffs)[0]   # said, not left out
    assert "Students on RLT explanations vs. the raw traces: better" in verdict_of(3.0, 2.776, diffs)[1]


def test_verdict_treats_seeds_that_agree_up_to_rounding_as_flat():
    # accuracies 0.7, 0.8, 0.9 vs 0.6, 0.7, 0.8: every difference is 0.1 but the floats give a spread of 1.6e-16
    d = [a - b for a, b in zip([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])]
    spread = stats.mean_ci95(d)
    assert 0 < spread["ci95"] < 1e-12
    line = verdict_of(3.0, 2.776, {"mean": spread["mean"], "ci95": spread["ci95"]})[1]
    assert "undetermined (every seed gave the same difference" in line


def test_pearson_with_fisher_interval_by_hand():
    # x = 1..5, y = 2 1 4 3 5: sxy = 8, sxx = syy = 10 -> r = 0.8;
    # Fisher: atanh(0.8) = 1.098612, +- 1.959964 / sqrt(2) = 1.385904 -> tanh(-0.287292), tanh(2.484516)
    p = stats.pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert p["r"] == pytest.approx(0.8) and p["n"] == 5
    assert p["ci95"][0] == pytest.approx(math.tanh(-0.287292), abs=1e-5)
    assert p["ci95"][1] == pytest.approx(math.tanh(2.484516), abs=1e-5)
    assert stats.pearson([1, 2, 3], [3, 2, 1])["r"] == pytest.approx(-1.0)
    assert math.isnan(stats.pearson([1, 2, 3], [5, 5, 5])["r"])  # a constant side has no correlation


def test_spearman_uses_average_ranks():
    assert stats.ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    # ranks x: 1 2 3, y: 1 3 2 -> Pearson of the ranks = 0.5
    assert stats.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert stats.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear


def test_demo_report_windows_by_hand():
    from rlt.report import reward_windows
    from rlt.stats import mean_se

    assert mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)))
    text = reward_windows([1, 2, 3, 9, 4, 5, 6], window=3)
    assert "first 3 steps 2.0000 ± 0.5774, last 3 steps 5.0000 ± 0.5774" in text and "z of the change 3.67" in text


# ----------------------------------------------------------------------------------------- the task


def test_splits_are_disjoint_whatever_the_seed():
    qs = {split: {r["question"] for seed in (0, 1) for r in arithmetic.generate_rows(split, 150, seed)}
          for split in arithmetic.SPLITS}
    assert not qs["train"] & qs["validation"] and not qs["train"] & qs["test"] and not qs["validation"] & qs["test"]
    rows = arithmetic.generate_rows("test", 50, 0)
    assert len({r["question"] for r in rows}) == 50  # distinct within a split
    assert all(arithmetic.split_of(r["operands"]) == "test" for r in rows)


def test_traces_are_correct_and_fold_as_configured():
    rows = arithmetic.generate_rows("train", 400, 3)
    folded = 0
    for r in rows:
        steps = arithmetic.parse_steps(r["reasoning_trace"])
        assert steps and all(sum(ops) == res for ops, res in steps)
        assert steps[-1][1] == sum(r["operands"]) == int(r["answer"])
        assert f"\\boxed{{{r['answer']}}}" in r["solution"]
        assert r["reasoning_trace"].startswith("\n\n") and r["reasoning_trace"].endswith("\n\n")
        folded += arithmetic.trace_stats(r["reasoning_trace"])["folded_steps"] > 0
    # P(a trace folds) = 1 - 0.65^(n-2) (n - 2 step boundaries), averaged over n = 4..7 terms: 0.752
    assert 0.68 < folded / len(rows) < 0.83
    full = arithmetic.generate_rows("train", 100, 3, arithmetic.ArithTask(trace="full"))
    assert all(arithmetic.trace_stats(r["reasoning_trace"])["folded_steps"] == 0 for r in full)
    assert [r["question"] for r in full] == [r["question"] for r in rows[:100]]  # same questions, other traces


def test_trace_text_and_stats_by_hand():
    text = arithmetic.trace_text([3, 7, 5, 9, 2], [1, 2, 1])
    assert text == "\n\n3 + 7 = 10\n\n10 + 5 + 9 = 24\n\n24 + 2 = 26\n\nSo the sum is 26.\n\n"
    assert arithmetic.trace_stats(text) == {"parsed": True, "steps": 3, "folded_steps": 1, "wrong_steps": 0}
    assert arithmetic.trace_stats("\n\n3 + 7 = 11\n\n") == {"parsed": True, "steps": 1, "folded_steps": 0,
                                                           "wrong_steps": 1}
    assert arithmetic.trace_stats("\n\nthree plus seven\n\n")["parsed"] is False


def test_dataset_ids_load_and_reject_bad_ones():
    from rlt.data.loading import load_rows
    from rlt.errors import ConfigError

    ds = load_rows("rlt-arith:validation:12:4:trace-full+max_terms-5")
    assert len(ds) == 12 and set(ds.column_names) >= {"system", "conversations", "answer", "operands"}
    assert all(len(o) <= 5 for o in ds["operands"])
    for bad, why in (("rlt-arith:dev:10:0", r"\(SPLIT one of \['train', 'validation', 'test'\], N >= 1\)"),
                     ("rlt-arith:train:10:0:trace-long", r"trace='long': choose raw or full"),
                     ("rlt-arith:train:10:0:colour-red", r"bad option 'colour-red'; keys: \[")):
        with pytest.raises(ConfigError, match=rf"^dataset_id_or_path={bad}: .*{why}"):
            load_rows(bad)


def test_rows_render_through_the_pipeline_formats(tokenizer):
    from rlt.data.loading import load_examples
    from rlt.data.formats import resolve_format
    from rlt.trainers.sft import build_sft_dataset

    fmt = resolve_format("bespoke_stratos", teacher_system_prompt=arithmetic.TEACHER_SYSTEM_PROMPT)
    exs = load_examples("rlt-arith:train:8:0", fmt)
    assert exs[0].system == arithmetic.STUDENT_SYSTEM_PROMPT
    ds = build_sft_dataset(tokenizer, exs, fmt, max_length=512, student=True)
    assert len(ds) == 8 and max(len(r) for r in ds["input_ids"]) < 200  # short prompts: cheap to train


# ----------------------------------------------------------------------------------------- the plan


def test_plan_is_a_consistent_graph_with_equal_budgets(tmp_path):
    from rlt.experiment.pipeline import PRESETS, VARIANTS, plan

    for name, p in PRESETS.items():
        jobs = plan(tmp_path / name, p, "cpu")
        names = [j.name for j in jobs]
        assert len(names) == len(set(names))
        seen = set()
        for j in jobs:  # priority order never puts a job before what it needs
            assert all(d in seen for d in j.deps), j.name
            seen.add(j.name)
        by = {j.name: j for j in jobs}
        students = [by[f"student_{v}_s{s}"] for v in VARIANTS for s in p.seeds]
        assert {j.kwargs["token_budget"] for j in students} == {p.student_tokens}
        assert by["teacher_warmup"].kwargs["token_budget"] == p.student_tokens
        reward_student = by["teacher_rl"].kwargs["overrides"]
        assert f"student_model={tmp_path / name / 'models' / 'student_raw_s0'}" in reward_student
        evals = [j for j in jobs if j.fn == "evaluate"]
        assert len(evals) == 3 * len(p.seeds) and all(":test:" in j.kwargs["data"] for j in evals)
        trained_on = [o for j in jobs if j.fn in ("sft", "grpo") for o in j.kwargs["overrides"]
                      if o.startswith("dataset_id_or_path=")]
        assert not any(":test:" in o or ":validation:" in o for o in trained_on)  # nothing trains on held-out data
        # the distilled students learn the questions their distillation job wrote: the training split's
        distilled = {j.kwargs["output"]: j.kwargs["data"] for j in jobs if j.fn == "distill"}
        assert all(":train:" in data for out, data in distilled.items() if "/distill/" in out)
        for o in trained_on:
            path = o.split("=", 1)[1]
            assert ":train:" in path or ":train:" in distilled[path], (o, distilled.get(path))
        assert names.index("teacher_rl") < names.index("student_raw_s1")  # the critical path first


def test_every_teacher_stage_uses_the_prompt_the_teacher_was_trained_with(tmp_path, monkeypatch):
    """Warm-up and RL recipes and every distillation prompt the teacher alike (score_gold builds its format from
    TEACHER_SYSTEM_PROMPT itself)."""
    import yaml

    from rlt.data.arithmetic import TEACHER_SYSTEM_PROMPT
    from rlt.experiment.pipeline import PRESETS, plan

    for name in ("teacher_sft", "teacher_rlt", "student_sft"):
        cfg = yaml.safe_load((ROOT / "cfgs" / "experiment" / f"{name}.yaml").read_text())
        assert cfg["teacher_system_prompt"] == TEACHER_SYSTEM_PROMPT, name
    distills = [j for j in plan(tmp_path, PRESETS["default"], "cpu") if j.fn == "distill"]
    assert {j.name for j in distills} == {"distill_rlt", "distill_warmup", "analysis_rewards"}
    assert all(j.kwargs["teacher_system_prompt"] == TEACHER_SYSTEM_PROMPT for j in distills)
    from rlt.experiment import runner, stages

    seen = {}
    monkeypatch.setattr(runner, "distill", lambda *a, **k: seen.update(k) or {})
    stages.distill(**distills[0].kwargs)   # the job's arguments reach the distillation
    assert seen["teacher_system_prompt"] == TEACHER_SYSTEM_PROMPT


def test_code_version_follows_the_source_and_the_commit(tmp_path):
    import subprocess

    from rlt.experiment.jobs import code_version

    pkg = tmp_path / "repo" / "rlt"
    (pkg / "data").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "data" / "b.py").write_text("y = 2\n")
    v0 = code_version(pkg)
    assert v0["commit"] is None and len(v0["code"]) == 12  # not a git checkout
    (pkg / "data" / "b.py").write_text("y = 3\n")
    v1 = code_version(pkg)
    assert v1["code"] != v0["code"]
    (pkg / "notes.txt").write_text("not code")
    assert code_version(pkg) == v1
    recipe = tmp_path / "repo" / "cfgs" / "experiment" / "student_sft.yaml"  # the jobs name recipes, not contents
    recipe.parent.mkdir(parents=True)
    recipe.write_text("learning_rate: 2.0e-3\n")
    v1 = code_version(pkg)
    recipe.write_text("learning_rate: 1.0e-4\n")
    assert code_version(pkg)["code"] != v1["code"]
    recipe.write_text("learning_rate: 2.0e-3\n")
    assert code_version(pkg) == v1
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    git = ["git", "-C", str(tmp_path / "repo")]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(git + cmd, check=True, env=env)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(pkg) == {"code": v1["code"], "commit": head}
    (pkg / "a.py").write_text("x = 2\n")
    assert code_version(pkg)["commit"] == head + "+dirty"
    (pkg / "a.py").write_text("x = 1\n")
    assert code_version(pkg)["commit"] == head
    recipe.write_text("learning_rate: 1.0e-4\n")
    assert code_version(pkg)["commit"] == head + "+dirty"


def test_a_failed_job_lets_the_running_ones_finish_and_keeps_their_results(tmp_path):
    from rlt.experiment.jobs import Job, JobFailed, run_jobs

    marker, out = tmp_path / "failed", tmp_path / "slow_out"
    jobs = [Job("slow", "experiment_job_fns:wait_for_then_write", {"path": str(out), "wait_for": str(marker)},
                str(tmp_path / "slow.log")),
            Job("bad", "experiment_job_fns:fail_after_writing", {"path": str(marker)}, str(tmp_path / "bad.log")),
            Job("after", "experiment_job_fns:fail_after_writing", {"path": str(tmp_path / "x")},
                str(tmp_path / "after.log"), deps=("bad",)),
            # ready all along, but both workers are busy until bad fails: it would start only after the failure
            Job("free", "experiment_job_fns:fail_after_writing", {"path": str(tmp_path / "y")},
                str(tmp_path / "free.log"))]
    saved = {}
    with pytest.raises(JobFailed, match=r"bad failed \(RuntimeError: injected failure\); see .*bad\.log"):
        run_jobs(jobs, workers=2, threads=1, on_done=lambda r: saved.update(r))
    assert out.read_text() == "done" and list(saved) == ["slow"]  # finished after the failure, and kept
    assert not (tmp_path / "x").exists()  # a job depending on the failed one never starts
    assert not (tmp_path / "y").exists()  # nor does any job after the failure, ready or not
    assert "injected failure" in (tmp_path / "bad.log").read_text()


def test_a_job_to_be_rerun_is_unlisted_before_it_starts(tmp_path):
    """A finished job that must run again (other settings, other code) leaves the saved record before it starts:
    a rerun that fails midway (its output already overwritten) must not leave it, or what follows it, "done"."""
    from rlt.experiment.jobs import Job, JobFailed, fingerprint, run_jobs

    now = {"code": "c" * 12, "commit": "abc1234"}
    first = Job("distill", "experiment_job_fns:fail_after_writing", {"path": str(tmp_path / "data")},
                str(tmp_path / "d.log"))
    after = Job("student", "experiment_job_fns:fail_after_writing", {"path": str(tmp_path / "x")},
                str(tmp_path / "s.log"), deps=("distill",))
    stale = {"distill": {"fingerprint": "another run's settings", **now},
             "student": {"fingerprint": fingerprint(after), **now}}
    saved = []
    with pytest.raises(JobFailed, match="distill failed"):
        run_jobs([first, after], workers=1, threads=1, results=stale, version=now,
                 on_done=lambda r: saved.append(dict(r)))
    assert saved == [{}]   # both records dropped (the student depends on the rerun), saved before distill started


def test_json_records_are_written_whole_and_read_with_one_line_errors(tmp_path):
    from rlt.cli import read_json, write_json_atomic
    from rlt.errors import ConfigError

    path = tmp_path / "jobs.json"
    assert read_json(path, {}) == {}
    write_json_atomic(path, {"results": {"a": 1}})
    assert read_json(path) == {"results": {"a": 1}} and [p.name for p in tmp_path.iterdir()] == ["jobs.json"]
    path.write_text('{"results": {"a"')   # cut off by a kill in the middle of a plain write
    with pytest.raises(ConfigError, match=r"jobs\.json: not valid JSON \(.*\); it was cut off or edited"):
        read_json(path)
    (tmp_path / "run_meta.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "rlt.experiment", "report", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "rlt.experiment report: error: " in r.stderr and "jobs.json: not valid JSON" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_cuda_without_cuda_is_refused_before_any_job(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rlt.experiment", "run", "--quick", "--device", "cuda", "--out",
                        str(tmp_path / "exp")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "rlt.experiment run: error: --device cuda: no CUDA device is visible" in r.stderr
    assert not (tmp_path / "exp").exists()   # nothing planned, nothing written


def test_out_keeps_the_earlier_runs_spelling_and_one_run_holds_it(tmp_path, monkeypatch):
    from rlt.errors import ConfigError
    from rlt.experiment.__main__ import earlier_spelling, hold_lock
    from rlt.experiment.pipeline import PRESETS, plan
    from rlt.experiment.jobs import fingerprint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp").mkdir()
    absolute = tmp_path / "exp"
    assert earlier_spelling(absolute, {"out": "exp"}) == Path("exp")     # same directory, the run's spelling
    assert earlier_spelling(absolute, {"out": "elsewhere"}) == absolute  # another directory: as given
    assert earlier_spelling(absolute, {}) == absolute
    (absolute / "run_meta.json").write_text(json.dumps({"out": "exp"}))  # a run from before jobs.json kept it
    assert earlier_spelling(absolute, {}) == Path("exp")
    fps = lambda out: {j.name: fingerprint(j) for j in plan(out, PRESETS["quick"], "cpu")}  # noqa: E731
    assert fps(Path("exp")) != fps(absolute)   # why the spelling matters
    held = hold_lock(absolute)
    with pytest.raises(ConfigError, match=r"another rlt.experiment run is using this directory"):
        hold_lock(absolute)
    held.close()
    hold_lock(absolute).close()


def test_kept_jobs_made_by_other_code_are_named_or_rerun_with_what_follows(caplog):
    from rlt.experiment.jobs import Job, fingerprint, kept

    jobs = [Job("models", "make_models", {"n": 1}, "l0"), Job("teacher", "sft", {"n": 2}, "l1", deps=("models",)),
            Job("student", "sft", {"n": 3}, "l2", deps=("teacher",)), Job("other", "sft", {"n": 4}, "l3")]
    fp = {j.name: fingerprint(j) for j in jobs}
    now = {"code": "c" * 12, "commit": "abc1234"}
    results = {"models": {"fingerprint": fp["models"], **now},
               "teacher": {"fingerprint": fp["teacher"], "code": "d" * 12, "commit": "0ld0001"},
               "student": {"fingerprint": fp["student"], **now},
               "other": {"fingerprint": fp["other"]}}  # saved before code versions were recorded
    with caplog.at_level(logging.WARNING, logger="rlt.experiment"):
        assert kept(jobs, results, now) == results
    assert ("2 of the finished jobs kept were made by other code than this run's (commit abc1234, code cccccccccccc):"
            " other, teacher by code not recorded; commit 0ld0001, code dddddddddddd") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlt.experiment"):
        assert set(kept(jobs, results, now, rerun_other_code=True)) == {"models"}  # the student followed the teacher
        assert set(kept(jobs, {"models": results["models"]}, now)) == {"models"}
    assert caplog.text == ""


# ----------------------------------------------------------------------------------------- end to end

SUMMARY_KEYS = {"task", "seeds", "reward_first10_mean", "reward_last10_mean", "reward_rise_z", "acc_raw", "acc_rlt",
                "acc_warmup", "reward_gain_correlation", "minutes"}


@pytest.mark.slow
def test_experiment_quick_end_to_end(tmp_path):
    """scripts/experiment.sh --quick: every stage runs and the report and summary have every key (CI's check of
    the experiment pipeline; the numbers of a quick run mean nothing)."""
    from conftest import run_cmd

    out = tmp_path / "exp"
    proc = run_cmd(["bash", "scripts/experiment.sh", "--quick", "--out", str(out)], timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    for key in ("acc_raw", "acc_rlt", "acc_warmup"):
        assert set(summary[key]) == {"mean", "ci95"} and 0 <= summary[key]["mean"] <= 1
    assert summary["seeds"] == [0, 1] and summary["minutes"] < 10
    assert all(0 <= x <= 1 for v in ("raw", "rlt", "warmup") for x in summary["no_answer_per_seed"][v])
    report = (out / "report.md").read_text()
    for png in re.findall(r"\]\((plots/[^)]+\.png)\)", report):
        assert (out / png).exists(), png
    assert "plots/reward_components.png" in report and "mean ± standard error" in report
    assert "| no answer |" in report and "*No answer*: the share of outputs" in report
    assert "| cut off (no end tag) |" in report
    for v in ("warmup", "rlt"):  # the distilled rows' share kept without the end tag, from their end_tag column
        assert 0 <= summary["explanations_selected"][v]["no_end_tag_frac"] <= 1
    assert "[experiment]" in proc.stdout and "log:" in proc.stdout  # stage lines name their logs
    assert "code " in summary["code"]["this_run"] and summary["code"]["jobs_by_other_code"] == {}
    assert f"Made by {summary['code']['this_run']}, every job of it." in report
    # a rerun resumes: nothing left to do
    again = run_cmd(["bash", "scripts/experiment.sh", "--quick", "--out", str(out)], timeout=600)
    assert "already done" in again.stdout and "start " not in again.stdout and "other code" not in again.stdout
    # the report is rebuilt from the finished run, and refused for a run of other settings (the default preset)
    py = [sys.executable, "-m", "rlt.experiment", "report", "--out", str(out)]
    run_cmd(py + ["--quick"], timeout=300)
    refused = run_cmd(py, timeout=300, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith(
        f"python -m rlt.experiment report: error: {out}: ") and "(a --quick run needs --quick)" in refused.stderr


def test_the_models_job_writes_its_models_afresh(tmp_path):
    """A rerun of the models job (another shape, a save cut off) never keeps what was in the directory."""
    from rlt.experiment.runner import build_tiny

    build_tiny(tmp_path / "m", 0, "h128-l2")
    (tmp_path / "m" / "stale.bin").write_text("x")
    build_tiny(tmp_path / "m", 0, "h256-l4")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (256, 4)
    assert not (tmp_path / "m" / "stale.bin").exists()

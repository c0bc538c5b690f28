"""scripts/setup_env.sh: which interpreter a new venv gets, and that it agrees with pyproject's requires-python.

Each case runs `setup_env.sh --print-python` with a PATH that holds only
stand-in interpreters (shell scripts printing a version, as `python -c` would)
and `dirname`, so the machine's own Pythons are out of sight.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup_env.sh"
BASH = shutil.which("bash")


def fake_python(bindir: Path, name: str, version: str | None) -> Path:
    """An executable `name` that reports `version` (MAJOR.MINOR); None: fails like an inactive pyenv shim."""
    path = bindir / name
    body = f"echo {version}" if version else f"echo 'pyenv: {name}: command not found' >&2; exit 127"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def print_python(tmp_path: Path, pythons: dict[str, str | None], rlt_python: str | None = None):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    os.symlink(shutil.which("dirname"), bindir / "dirname")
    for name, version in pythons.items():
        fake_python(bindir, name, version)
    env = {"PATH": str(bindir), "HOME": str(tmp_path)}
    if rlt_python is not None:
        env["RLT_PYTHON"] = rlt_python
    return subprocess.run([BASH, str(SCRIPT), "--print-python"], env=env, capture_output=True, text=True, timeout=60)


def test_rlt_python_wins(tmp_path):
    chosen = fake_python(tmp_path, "my-python", "3.13")
    proc = print_python(tmp_path, {"python3.11": "3.11", "python3.12": "3.12"}, rlt_python=str(chosen))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(chosen)


def test_python311_preferred_when_present(tmp_path):
    proc = print_python(tmp_path, {"python3.13": "3.13", "python3.12": "3.12", "python3.11": "3.11", "python3": "3.12"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "bin" / "python3.11")


def test_python312_when_311_absent(tmp_path):
    proc = print_python(tmp_path, {"python3.12": "3.12", "python3.13": "3.13", "python3": "3.10"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "bin" / "python3.12")


def test_a_python311_that_does_not_run_is_skipped(tmp_path):
    # as on a machine whose pyenv has 3.11 active but a python3.12 shim for an inactive version
    proc = print_python(tmp_path, {"python3.11": None, "python3.12": "3.12"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "bin" / "python3.12")


def test_plain_python3_when_it_is_supported(tmp_path):
    proc = print_python(tmp_path, {"python3.10": "3.10", "python3": "3.13"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "bin" / "python3")


def test_only_python310_gives_one_line_and_exit_2(tmp_path):
    proc = print_python(tmp_path, {"python3.10": "3.10", "python3": "3.10"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RLT_PYTHON" in lines[0] and "3.11" in lines[0], proc.stderr


def test_unsupported_rlt_python_gives_one_line_and_exit_2(tmp_path):
    old = fake_python(tmp_path, "old-python", "3.10")
    proc = print_python(tmp_path, {"python3.11": "3.11"}, rlt_python=str(old))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RLT_PYTHON" in lines[0] and "3.10" in lines[0], proc.stderr


def test_unsupported_rlt_python_message_reads_right(tmp_path):
    proc = print_python(tmp_path, {}, rlt_python=str(fake_python(tmp_path, "old-python", "3.10")))
    assert f"RLT_PYTHON={tmp_path}/old-python is Python 3.10; rlt needs Python 3.11 3.12 3.13" in proc.stderr
    (tmp_path / "again").mkdir()
    proc = print_python(tmp_path / "again", {}, rlt_python=str(fake_python(tmp_path, "shim", None)))
    assert f"RLT_PYTHON={tmp_path}/shim does not run; rlt needs Python 3.11 3.12 3.13" in proc.stderr


def venv_python(path: Path, version: str, pip_works: bool) -> Path:
    """A stand-in interpreter: reports ``version``; ``-m pip`` works or not; ``-m venv DIR`` makes DIR/bin/python
    and then fails, as Debian's python3.X without python3.X-venv does (ensurepip missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/bin/sh
case "$1 $2" in
  "-c "*) echo {version} ;;
  "-m pip") {'exit 0' if pip_works else 'echo "No module named pip" >&2; exit 1'} ;;
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; echo "ensurepip is not available" >&2; exit 1 ;;
esac
""")
    path.chmod(0o755)
    return path


def test_setup_env_leaves_no_half_made_venv_and_refuses_a_broken_one(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "RLT_VENV": str(venv), "PATH": "/usr/bin:/bin"}
    env["RLT_PYTHON"] = str(venv_python(tmp_path / "py312", "3.12", pip_works=True))
    proc = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "-m venv' failed: install its venv module" in proc.stderr, proc.stderr
    assert not venv.exists()   # a rerun would have taken the half-made venv for a working one
    for version, pip_works, says in (("3.12", False, "has no working pip"), ("3.10", True, "is Python 3.10")):
        venv_python(venv / "bin" / "python", version, pip_works)
        proc = subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        line = proc.stderr.strip()
        assert proc.returncode == 2 and "\n" not in line, proc.stderr
        assert f"[setup] {venv} exists but {says}; remove it (rm -rf {venv}) and rerun" in line
        assert (venv / "bin" / "python").exists()   # an existing venv is never removed


def test_unknown_argument_is_refused(tmp_path):
    proc = subprocess.run([BASH, str(SCRIPT), "--nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--print-python" in proc.stderr


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13", "3.14"])
def test_setup_env_and_requires_python_agree(tmp_path, version):
    """setup_env.sh accepts exactly the versions pyproject's requires-python admits."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        pytest.skip("tomllib needs Python 3.11")
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    proc = print_python(tmp_path, {"python3": version})
    assert (proc.returncode == 0) == (f"{version}.0" in spec), (version, str(spec), proc.stderr)


def load_gpu_check_helper():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_helper", ROOT / "scripts" / "gpu_check_helper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_installs_missing_wheels_and_never_torch(tmp_path):
    helper = load_gpu_check_helper()
    for name in ("torch-2.13.0+cu130-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "nvidia_cudnn_cu13-9.20.0.48-py3-none-manylinux_2_27_x86_64.whl",
                 "triton-3.7.0-cp312-cp312-manylinux_2_28_x86_64.whl",
                 "trl-1.16.0-py3-none-any.whl", "transformers-5.19.0-py3-none-any.whl",
                 "hydra_core-1.3.8-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    installed = {"transformers": "5.17.0", "hydra-core": "1.3.8", "torch": "2.11.0+cu130"}.get
    chosen = [p.name for p in helper.wheels_to_install(tmp_path, installed=installed)]
    assert chosen == ["transformers-5.19.0-py3-none-any.whl", "trl-1.16.0-py3-none-any.whl"]


def test_gpu_check_requirements_leave_out_torch():
    helper = load_gpu_check_helper()
    reqs = helper.project_requirements()
    names = {helper.canon(r.split("=")[0].split(">")[0].split("<")[0]) for r in reqs}
    assert "torch" not in names and {"trl", "transformers", "deepspeed", "hydra-core"} <= names


@pytest.mark.parametrize("statuses,passed,verdict", [
    (["skip", "skip"], False, "NOTHING RAN, 2 skipped"),
    (["pass", "skip"], True, "PASS: 1 stage(s) passed, 1 skipped"),
    (["pass", "timeout"], False, "FAIL: s1"),
])
def test_gpu_check_verdict_needs_a_passed_stage_and_no_failure(tmp_path, statuses, passed, verdict):
    helper = load_gpu_check_helper()
    stages = tmp_path / "stages.jsonl"
    for i, status in enumerate(statuses):
        helper.main(["record", "--stages", str(stages), "--name", f"s{i}", "--status", status])
    helper.main(["summary", "--stages", str(stages), "--out", str(tmp_path), "--mode", "gpu", "--budget", "60",
                 "--total", "5"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is passed
    assert f"**{verdict}" in (tmp_path / "summary.md").read_text()


def test_gpu_check_notes_carry_the_output_layer_numbers(tmp_path):
    helper = load_gpu_check_helper()
    bench = tmp_path / "bench_output_layer.json"
    bench.write_text(json.dumps({"rows": {"4096": {
        "bare": {"seconds": 0.01, "peak_extra_gb": 0.1},
        "rowchunk": {"seconds": 0.0152, "peak_extra_gb": 0.3, "max_abs_diff": 2e-6, "over_bare": 1.52},
        "fused": {"seconds": 0.0111, "peak_extra_gb": 0.0, "max_abs_diff": 3e-6, "over_bare": 1.11},
        "fused_tiles": {"128x64w8": {"seconds": 0.0112, "peak_extra_gb": 0.0, "max_abs_diff": 3e-6, "over_bare": 1.12},
                        "256x64w8": {"seconds": 0.0093, "peak_extra_gb": 0.0, "max_abs_diff": 3e-6, "over_bare": 0.93},
                        "256x64w8s4": {"error": "out of resource: shared memory"}},
        "best_fused_tiles": "256x64w8"}}}))
    stages = tmp_path / "stages.jsonl"
    helper.main(["record", "--stages", str(stages), "--name", "bench_output_layer", "--status", "pass",
                 "--head-bench", str(bench)])
    rec = json.loads(stages.read_text())
    assert helper.notes(rec) == ("N=4096: bare 0.010s, rowchunk 0.015s (1.52x bare), fused 0.011s (1.11x bare), "
                                 "fused 256x64w8 (fastest tiles) 0.009s (0.93x bare)")


def test_gpu_check_accuracy_bound_covers_the_second_backend(tmp_path):
    helper = load_gpu_check_helper()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"main": {"rlt_s": 1.0, "oracle_s": 2.0, "max_abs_diff": 2e-6, "alt_backend": "fused",
                                          "rlt_alt_s": 0.9, "max_abs_diff_alt": 3e-4}}))
    stages = tmp_path / "stages.jsonl"
    helper.main(["record", "--stages", str(stages), "--name", "b", "--status", "pass", "--bench", str(bench),
                 "--max-abs-diff", "1e-5"])
    rec = json.loads(stages.read_text())
    assert rec["status"] == "fail" and rec["reason"] == "max |rlt - oracle| 0.0003 > 1e-05"
    assert "rlt with fused 0.90s" in helper.notes(rec)


def test_gpu_check_score_input_rows(tmp_path):
    helper = load_gpu_check_helper()
    helper.main(["score-input", str(tmp_path / "in.jsonl"), "3"])
    rows = [json.loads(line) for line in (tmp_path / "in.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"question", "solution", "completion"} for r in rows)
    assert all(r["completion"].endswith("<|end_of_explanation|>") and r["solution"] for r in rows)


def record(helper, stages: Path, name: str, status: str, run: str, log: Path | None = None, **extra) -> None:
    args = ["record", "--stages", str(stages), "--stages-dir", str(stages.parent), "--name", name,
            "--status", status, "--run", run, "--seconds", "10"]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("log\n")
        log.with_suffix(".mem").write_text("0, 1024\n")
        args += ["--log", str(log), "--mem", str(log.with_suffix(".mem"))]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    helper.main(args)


def test_gpu_check_resume_keeps_what_passed_and_reruns_the_rest(tmp_path, capsys):
    helper = load_gpu_check_helper()
    out, stages = tmp_path, tmp_path / "stages.jsonl"
    helper.main(["begin", "--out", str(out), "--mode", "gpu", "--run", "R1"])
    record(helper, stages, "a", "pass", "R1", out / "logs" / "a.log")
    bench = out / "bench_b.json"
    bench.write_text(json.dumps({"main": {"rlt_s": 1.0, "oracle_s": 2.0, "max_abs_diff": 1e-3}}))
    record(helper, stages, "b", "pass", "R1", out / "logs" / "b.log", bench=bench, max_abs_diff=1e-5)  # -> fail
    record(helper, stages, "c", "skip", "R1")
    capsys.readouterr()

    helper.main(["begin", "--out", str(out), "--mode", "gpu", "--run", "R2", "--resume"])
    assert capsys.readouterr().out.splitlines() == ["a", "b"]   # passed; failed (c was skipped: no record kept)
    assert (out / "logs" / "a.log").exists() and (out / "logs" / "a.mem").exists()
    assert not stages.exists()

    # the second call: a is kept, b runs again and passes, c is skipped again
    helper.main(["keep", "--stages", str(stages), "--kept", str(out / "kept.jsonl"), "--name", "a"])
    record(helper, stages, "b", "pass", "R2", out / "logs" / "b.log")
    record(helper, stages, "c", "skip", "R2")
    helper.main(["summary", "--stages", str(stages), "--out", str(out), "--mode", "gpu", "--budget", "300",
                 "--total", "25"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["passed_stages"] == ["a", "b"]
    assert [c["run"] for c in summary["calls"]] == ["R1", "R2"]
    assert summary["calls"][0]["stopped_early"] and summary["total_s"] == 10 + 25   # R1 wrote no summary
    md = (out / "summary.md").read_text()
    assert "total 35 s in 2 calls" in md
    assert "| a |  | pass | 10 | 1.0 | 1 |" in md and "| b |  | pass | 10 | 1.0 | 2 |" in md

    # a third call: what passed in either earlier call is kept (also when the second stopped before its summary)
    capsys.readouterr()
    (out / "summary.json").unlink()
    helper.main(["begin", "--out", str(out), "--mode", "gpu", "--run", "R3", "--resume"])
    assert capsys.readouterr().out.splitlines() == ["a b", ""]


def test_gpu_check_resume_refuses_another_machine_in_one_line(tmp_path, capsys):
    helper = load_gpu_check_helper()
    with pytest.raises(SystemExit) as e:
        helper.main(["begin", "--out", str(tmp_path), "--mode", "gpu", "--run", "R1", "--resume"])
    assert e.value.code == 2 and "no earlier run" in capsys.readouterr().err
    (tmp_path / "runs.jsonl").write_text(json.dumps({"run": "R0", "mode": "gpu", "card": "NVIDIA H200",
                                                     "gpus": 1}) + "\n")
    (tmp_path / "stages.jsonl").write_text(json.dumps({"name": "a", "status": "pass", "seconds": 1}) + "\n")
    with pytest.raises(SystemExit) as e:
        helper.main(["begin", "--out", str(tmp_path), "--mode", "gpu", "--run", "R1", "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "NVIDIA H200 x1 (gpu)" in err and "resume on the same kind of machine" in err
    assert (tmp_path / "stages.jsonl").exists()   # nothing lost
    (tmp_path / "stages.jsonl").write_text('{"name": "a", "status": "pass"}\n{"name": "b", "sta\n')
    with pytest.raises(SystemExit, match=r"stages.jsonl, line 2: not a JSON record"):
        helper.read_jsonl(tmp_path / "stages.jsonl")


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_script_resumed_runs_only_what_did_not_pass(tmp_path):
    """The shell side: a resumed call copies the earlier records in place (the stage that passed, and the failed
    one not chosen now), records the rest, and here runs nothing; its verdict still counts the kept failure."""
    helper = load_gpu_check_helper()
    out = tmp_path / "out"
    out.mkdir()
    me = {"run": "R0", "mode": "cpu-smoke", **helper.machine_info()}
    (out / "runs.jsonl").write_text(json.dumps(me) + "\n")
    earlier = [{"name": "bench_output_layer", "status": "pass", "seconds": 9.0, "run": "R0", "what": "head"},
               {"name": "sft_zero3", "status": "fail", "seconds": 5.0, "run": "R0", "what": "sft"}]
    (out / "stages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(out), "RLT_GPU_CHECK_RESUME": "1",
           "RLT_GPU_CHECK_STAGES": "bench_output_layer", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    by_name = {s["name"]: s for s in summary["stages"]}
    assert by_name["bench_output_layer"] == earlier[0] and by_name["sft_zero3"] == earlier[1]
    assert by_name["sft_zero1"]["status"] == "skip" and by_name["sft_zero1"]["run"] != "R0"
    assert by_name["install"]["status"] == "skip"   # nothing runs in this call, so nothing needs it
    assert [s["name"] for s in summary["stages"]][:3] == ["install", "cuda_tests", "bench_output_layer"]
    assert summary["failed"] == ["sft_zero3"] and [c["run"] for c in summary["calls"]][0] == "R0"
    assert not list(tmp_path.glob("rlt-gpu-check.*"))   # the work dir is gone

    env["RLT_GPU_CHECK_RESUME"] = "yes"
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "RLT_GPU_CHECK_RESUME=yes: accepted 0" in proc.stderr
    for key, value in (("RLT_GPU_CHECK_BUDGET", "20m"), ("RLT_GPU_CHECK_7B_LAYERS", "0")):
        bad = {**env, "RLT_GPU_CHECK_RESUME": "0", key: value}
        proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=bad, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"{key}={value}: accepted a whole number >= 1" in proc.stderr
        assert proc.stdout == ""  # refused before any stage


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_short_budget_skips_a_long_stage_and_runs_a_later_short_one(tmp_path):
    """A stage whose usual time (EXPECT in the script) exceeds the budget left is skipped with a reason naming both
    numbers, not started and cut off; a later, shorter stage still runs. Each call records the project's commit."""
    out = tmp_path / "out"
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(out), "RLT_GPU_CHECK_BUDGET": "150", "TMPDIR": str(tmp_path),
           "RLT_GPU_CHECK_STAGES": "bench_reward_7b_bf16,score_tiny", "RLT_GPU_CHECK_COMMIT": "abc1234",
           "RLT_GPU_CHECK_ARCHIVE": str(tmp_path / "check.tgz")}
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    by_name = {s["name"]: s for s in summary["stages"]}
    big = by_name["bench_reward_7b_bf16"]
    assert big["status"] == "skip" and big["seconds"] == 0
    assert big["reason"].startswith("not run: it takes about 160s, ") and "of the 150s budget left" in big["reason"]
    assert not (out / "bench_7b_bf16.json").exists()
    assert by_name["score_tiny"]["status"] == "pass" and summary["passed_stages"] == ["score_tiny"]
    assert summary["calls"][0]["commit"] == "abc1234"
    assert "| commit abc1234 | total " in (out / "summary.md").read_text()
    assert not list(tmp_path.glob("rlt-gpu-check.*"))
    # the archive holds what a resumed call needs, as of the end of the call, and none of the rebuilt folders
    with tarfile.open(tmp_path / "check.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
        assert json.load(tar.extractfile("./summary.json")) == summary
    assert {"runs.jsonl", "stages.jsonl", "summary.md", "logs/score_tiny.log"} <= names
    assert (out / "site").is_dir() and not any(n.startswith(("site", "torch_extensions")) for n in names)
    assert not (tmp_path / "check.tgz.part").exists()

    env["RLT_GPU_CHECK_ARCHIVE"] = str(out / "check.tgz")
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is inside the results dir" in proc.stderr
    assert json.loads((out / "summary.json").read_text()) == summary   # refused before anything was touched


def test_gpu_check_commit_names_the_checkout(monkeypatch):
    helper = load_gpu_check_helper()
    monkeypatch.delenv("RLT_GPU_CHECK_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        assert helper.project_commit() == "unknown"
    else:
        assert helper.project_commit().split("+")[0] == head.stdout.strip()
    monkeypatch.setenv("RLT_GPU_CHECK_COMMIT", "v1-on-a-copy")
    assert helper.project_commit() == "v1-on-a-copy"


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_stage_without_expected_time_is_refused_before_anything_runs(tmp_path):
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert script.count("[score_tiny]=") == 2   # one expected time per mode
    (tmp_path / "scripts").mkdir()
    copy = tmp_path / "scripts" / "gpu_check.sh"
    copy.write_text(script.replace("[score_tiny]=20 ", ""))   # the cpu-smoke entry
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(tmp_path / "out")}
    proc = subprocess.run([BASH, str(copy), "--cpu-smoke"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: stage score_tiny has no expected time in EXPECT (cpu-smoke)"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_archive_of_a_killed_call_holds_the_stages_it_finished(tmp_path):
    """What a lent machine does when its time runs out: the call is killed from outside (no trap runs). The
    archive written after each stage still holds the records of the stages that finished before."""
    import signal
    import time

    out, archive = tmp_path / "out", tmp_path / "check.tgz"
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(out), "RLT_GPU_CHECK_ARCHIVE": str(archive),
           "RLT_GPU_CHECK_STAGES": "install,score_tiny", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "logs" / "score_tiny.log").exists():   # install finished, score_tiny started
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # the stage runs in its own process group under timeout; a SIGKILL of the script leaves it: stop it here
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "rlt-gpu-check.")], check=False)
    with tarfile.open(archive) as tar:
        records = [json.loads(line) for line in tar.extractfile("./stages.jsonl").read().decode().splitlines()]
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert [(r["name"], r["status"]) for r in records] == [("install", "pass")]   # as of the end of install
    assert "runs.jsonl" in names and "summary.json" not in names


def test_gpu_check_expected_times_never_skip_a_prerequisite_before_its_stage():
    """The budget only shrinks, so a stage can be skipped for time while a later one runs only when the later one
    expects less; a prerequisite must therefore expect no more than every stage that needs it, in both modes."""
    import re

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    tables = [dict((k, int(v)) for k, v in re.findall(r"\[([\w.]+)\]=(\d+)", block))
              for block in re.findall(r"EXPECT=\((.*?)\)", script, flags=re.S)]
    stages = re.search(r"ALL_STAGES=\((.*?)\)", script, flags=re.S).group(1).split()
    assert len(tables) == 2 and all(set(t) == set(stages) for t in tables)
    needs = {"install": [s for s in stages if s != "install"], "models": ["rl_0.5b", "rl_7b_offload_step"],
             "build_cpu_adam": ["sft_offload", "rl_7b_offload_step"]}
    for table in tables:
        for pre, users in needs.items():
            assert all(table[pre] <= table[u] for u in users), (pre, {u: table[u] for u in users}, table[pre])


def earlier_failed_run(tmp_path: Path) -> tuple[Path, dict]:
    """A results dir as an earlier CPU-smoke call on this machine left it: bench_reward_7b_bf16 failed."""
    helper = load_gpu_check_helper()
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.jsonl").write_text(json.dumps({"run": "R0", "mode": "cpu-smoke", **helper.machine_info()}) + "\n")
    failed = {"name": "bench_reward_7b_bf16", "status": "fail", "seconds": 5.0, "run": "R0", "what": "bench",
              "reason": "exit code 1"}
    (out / "stages.jsonl").write_text(json.dumps(failed) + "\n")
    return out, failed


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_resumed_failure_chosen_again_but_out_of_budget_keeps_its_record(tmp_path):
    """A stage that failed in an earlier call, chosen again in a call whose budget no longer covers it, keeps its
    failed record: the table and the exit code never turn an unresolved failure into a skip."""
    out, failed = earlier_failed_run(tmp_path)
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(out), "RLT_GPU_CHECK_RESUME": "1", "RLT_GPU_CHECK_BUDGET": "150",
           "RLT_GPU_CHECK_STAGES": "bench_reward_7b_bf16", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "bench_reward_7b_bf16: not run again (it takes about 160s" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {s["name"]: s for s in summary["stages"]}["bench_reward_7b_bf16"] == failed
    assert summary["failed"] == ["bench_reward_7b_bf16"] and summary["passed_stages"] == ["install"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("where", ["inside", "inside_dotted", "folder", "no_folder"])
def test_gpu_check_archive_path_refused_in_one_line(tmp_path, where):
    out = tmp_path / "out"
    (tmp_path / "adir").mkdir()
    archive = {"inside": out / "a.tgz", "inside_dotted": tmp_path / "x" / ".." / "out" / "." / "a.tgz",
               "folder": tmp_path / "adir", "no_folder": tmp_path / "missing" / "a.tgz"}[where]
    env = {**os.environ, "RLT_GPU_CHECK_OUT": f"{out}//", "RLT_GPU_CHECK_ARCHIVE": str(archive)}
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("is inside the results dir" if where.startswith("inside") else "accepted a file name") in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_stage_cut_by_the_budget_is_not_a_failure_and_a_cold_resume_unpacks_the_archive(tmp_path):
    """A stage that starts (its EXPECT fits) but outruns the budget left is recorded as "cut": not failed, and run
    again by a resumed call. RLT_GPU_CHECK_RESUME_FROM unpacks an earlier call's archive where no run is (a fresh
    machine), so the resumed call goes on from it."""
    out, archive = tmp_path / "out", tmp_path / "check.tgz"
    # the CPU-smoke reward benchmark takes minutes: told it takes 1 s, it starts and the 60 s budget cuts it off
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(out), "RLT_GPU_CHECK_BUDGET": "60", "TMPDIR": str(tmp_path),
           "RLT_GPU_CHECK_STAGES": "bench_reward_7b_bf16", "RLT_GPU_CHECK_EXPECT": "bench_reward_7b_bf16=1",
           "RLT_GPU_CHECK_ARCHIVE": str(archive)}
    script = [BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"]
    proc = subprocess.run(script, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    cut = {s["name"]: s for s in summary["stages"]}["bench_reward_7b_bf16"]
    assert cut["status"] == "cut", proc.stdout[-2000:]
    assert cut["reason"].startswith("cut off when the budget ran out") and "EXPECT 1s" in cut["reason"]
    assert summary["failed"] == [] and "bench_reward_7b_bf16" in summary["skipped"]
    assert proc.returncode == 1 and "NOTHING RAN" in (out / "summary.md").read_text()   # nothing passed either
    assert not list(tmp_path.glob("rlt-gpu-check.*"))

    fresh = tmp_path / "fresh"   # a cold machine: the results dir is empty, the archive came with the call
    resumed = {**env, "RLT_GPU_CHECK_OUT": str(fresh), "RLT_GPU_CHECK_RESUME": "1",
               "RLT_GPU_CHECK_RESUME_FROM": str(archive), "RLT_GPU_CHECK_ARCHIVE": str(tmp_path / "check2.tgz")}
    proc = subprocess.run(script, env=resumed, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert f"unpacked {archive} into {fresh}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((fresh / "summary.json").read_text())
    runs = [json.loads(line) for line in (fresh / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and runs[0]["run"] == cut["run"]   # the first call's record came from the archive
    again = {s["name"]: s for s in summary["stages"]}["bench_reward_7b_bf16"]
    assert again["status"] == "cut" and again["run"] != cut["run"]   # run again, not kept from the first call

    for bad, match in (({"RLT_GPU_CHECK_RESUME": "0"}, "RLT_GPU_CHECK_RESUME_FROM=.*: accepted an archive file"),
                       ({"RLT_GPU_CHECK_RESUME_FROM": str(tmp_path / "none.tgz")}, "accepted an archive file"),
                       ({"RLT_GPU_CHECK_EXPECT": "score_tiny=fast"}, "'score_tiny=fast': accepted NAME=SECONDS"),
                       ({"RLT_GPU_CHECK_EXPECT": "score_tiny"}, "'score_tiny': accepted NAME=SECONDS"),
                       ({"RLT_GPU_CHECK_EXPECT": "nope=3"}, "'nope=3': accepted NAME=SECONDS")):
        proc = subprocess.run(script, env={**resumed, **bad}, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and re.search(match, proc.stderr) and proc.stdout == "", (bad, proc.stderr)


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_gpu_check_earlier_failure_cut_again_by_the_budget_keeps_its_record(tmp_path):
    """A stage that failed in an earlier call, run again and cut off by the budget, keeps the failed record: the
    last call's table never reads PASS over an unresolved failure."""
    out, failed = earlier_failed_run(tmp_path)
    env = {**os.environ, "RLT_GPU_CHECK_OUT": str(out), "RLT_GPU_CHECK_RESUME": "1", "RLT_GPU_CHECK_BUDGET": "60",
           "RLT_GPU_CHECK_STAGES": "bench_reward_7b_bf16", "RLT_GPU_CHECK_EXPECT": "bench_reward_7b_bf16=1,install=1",
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([BASH, str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "bench_reward_7b_bf16: cut off by the budget after" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {s["name"]: s for s in summary["stages"]}["bench_reward_7b_bf16"] == failed
    assert summary["failed"] == ["bench_reward_7b_bf16"] and not summary["passed"] and proc.returncode == 1

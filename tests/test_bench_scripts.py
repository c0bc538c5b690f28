"""The benchmark scripts run, write what they say, and refuse what cannot run (small sizes, CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name, *args, env=None):
    base = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    base.pop("TRITON_INTERPRET", None)   # only where a test asks for the interpreter
    env = dict(base, **(env or {}))
    return subprocess.run([sys.executable, f"scripts/{name}", *args], capture_output=True, text=True, timeout=900,
                          env=env, cwd=ROOT)


def test_output_layer_benchmark(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "head.json"
    r = script("bench_output_layer.py", "--rows", "40", "--out", str(out), "--backends", "online,rowchunk,fused")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "fused runs on CUDA" in data["left_out"]["fused"]           # said, not silently dropped
    row = data["rows"]["40"]
    assert set(row) == {"bare", "online", "rowchunk"}
    assert all(row[b]["max_abs_diff"] < 1e-5 and row[b]["seconds"] > 0 for b in ("online", "rowchunk"))
    r = script("bench_output_layer.py", "--rows", "40", "--out", str(out), "--backends", "online", "--tolerance", "0")
    assert r.returncode == 1 and "above --tolerance 0" in r.stderr


def test_output_layer_benchmark_times_fused_launch_configurations(tmp_path):
    """--fused-tiles in triton's interpreter (the kernel's values; no speed): every configuration is checked
    against the float64 reference and the fastest is named; a bad configuration is refused before any work."""
    pytest.importorskip("triton")
    out = tmp_path / "head.json"
    env = {"TRITON_INTERPRET": "1"}
    r = script("bench_output_layer.py", "--vocab", "1000", "--hidden", "64", "--rows", "20,150", "--backends",
               "rowchunk,fused", "--fused-tiles", "128x64w8,256x32w4s2", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert (data["vocab"], data["hidden"], data["left_out"]) == (1000, 64, {})
    for row in data["rows"].values():
        assert set(row["fused_tiles"]) == {"128x64w8", "256x32w4s2"}
        times = {k: v["seconds"] for k, v in row["fused_tiles"].items()}
        assert row["best_fused_tiles"] == min(times, key=times.get)
        assert all(v["max_abs_diff"] < 1e-5 for v in [row["fused"], *row["fused_tiles"].values()])
    r = script("bench_output_layer.py", "--fused-tiles", "128x60w8", "--out", str(tmp_path / "x.json"), env=env)
    assert r.returncode == 1 and "--fused-tiles: fused tiles '128x60w8': expected VxKwW" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_reward_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    r = script("bench_reward.py", "--quick", "--shape", "tiny", "--cases", "main", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    main = json.loads(out.read_text())["main"]
    assert main["completions"] == 4 and main["logprob_backend"] == "online" and main["packing"] == "padded"
    assert main["max_abs_diff"] <= 1e-5 and main["targets_met"]["max_abs_diff"] is True
    for k in ("rlt_s", "oracle_s", "floor_s", "floor_unpadded_s", "peak_extra_gb_rlt"):
        assert main[k] > 0, k
    assert main["floor_ratio"] == pytest.approx(main["rlt_s"] / main["floor_s"])
    r = script("bench_reward.py", "--quick", "--backend", "fused", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 1 and "reward_logprob_backend=fused runs on CUDA" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_reward_benchmark_second_backend_keys(tmp_path):
    """--also-backend: the *_alt keys from a second rlt measurement (summarise, with made-up timings)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_reward", ROOT / "scripts" / "bench_reward.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(packing="auto", backend="auto", token_budget=4096, vocab_chunk_size=2048,
                              shape="tiny", dtype="bfloat16", also_backend="online")
    run = lambda secs, rewards: {"seconds": secs, "peak_extra_gb": 0.5, "cpu_seconds": secs, "rewards": rewards,
                                 "n": 2, "tokens": 10}
    r = {"rlt": run(2.0, [-1.0, -2.0]), "oracle": run(6.0, [-1.0, -2.5]), "floor": run(1.6, []),
         "floor_unpadded": run(1.5, []), "rlt_alt": run(1.8, [-1.25, -2.0]),
         "fp32_reference": {"rewards": [-1.0, -1.75]}}
    s = bench.summarise(r, "cpu", args)
    assert s["alt_backend"] == "online" and s["rlt_alt_s"] == 1.8
    assert s["speedup_vs_oracle_alt"] == pytest.approx(6.0 / 1.8)
    assert s["floor_ratio_alt"] == pytest.approx(1.8 / 1.6)
    assert s["floor_ratio_unpadded_alt"] == pytest.approx(1.2)
    assert s["max_abs_diff_alt"] == pytest.approx(0.5)           # |-2.0 - (-2.5)|
    assert s["bf16_err_rlt_alt"] == pytest.approx(0.25)          # both rows off by 0.25 from the fp32 rewards
    assert s["bf16_mean_err_rlt_alt"] == pytest.approx(0.25)
    assert s["max_abs_diff"] == pytest.approx(0.5) and s["bf16_err_rlt"] == pytest.approx(0.25)


def test_bench_reward_checks_a_backend_on_a_small_case_before_building_models(monkeypatch):
    """A kernel that fails (e.g. does not compile with the machine's Triton) or computes wrong values stops the
    benchmark in one line before any model is built."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_reward
    from rlt.rewards import logprobs

    bench_reward.check_backend_runs("--backend", "online", torch.device("cpu"), torch.float32)   # the real one

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed\nmore")

    monkeypatch.setattr(logprobs, "output_logprobs", broken)
    with pytest.raises(SystemExit, match=r"--also-backend online fails on a small case on cpu \(RuntimeError: "
                                         r"PassManager::run failed\)$"):
        bench_reward.check_backend_runs("--also-backend", "online", torch.device("cpu"), torch.float32)
    monkeypatch.setattr(logprobs, "output_logprobs", lambda h, lab, *a, **k: torch.zeros(len(lab)))
    with pytest.raises(SystemExit, match="gives wrong log-probs on a small case on cpu"):
        bench_reward.check_backend_runs("--backend", "online", torch.device("cpu"), torch.float32)

"""The ``fused`` output-layer backend (one Triton kernel).

The kernel tests run on CUDA when there is a GPU (``pytest -m cuda``, as scripts/gpu_check.sh does) and, on a
machine without one, inside triton's CPU interpreter: ``test_interpreter_runs_the_fused_tests`` runs this
file again in a child process with ``TRITON_INTERPRET=1`` (the interpreter is chosen when triton is imported).
"""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from rlt.errors import ConfigError  # noqa: E402
from rlt.rewards import fused_logprobs as FL  # noqa: E402
from rlt.rewards import logprobs as L  # noqa: E402
from test_logprobs import (  # noqa: E402,F401  (fixtures used by the tests below)
    _reward, gqa_model, reference, reward_setup, sample_sequences, unpadded_reference)

INTERPRETED = FL.interpreting()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_TESTS = 8 + len(FL.SWEEP) - 1   # the tests marked ``kernel`` below (parametrised cases included)


def kernel(test):
    """A test of the kernel itself: CUDA, or the CPU interpreter."""
    runs = torch.cuda.is_available() or INTERPRETED
    return pytest.mark.cuda(pytest.mark.skipif(not runs, reason="needs CUDA or TRITON_INTERPRET=1")(test))


def head(n, vocab, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    b = torch.randn(vocab, generator=g)
    lab = torch.randint(0, vocab, (n,), generator=g)
    tile = FL.Tiles().block_v
    edges = [0, vocab - 1, tile - 1, tile, 2 * tile]   # first, last, tile edges
    lab[:len(edges)] = torch.tensor([e for e in edges if e < vocab] + [0] * sum(e >= vocab for e in edges))
    return h, w, b, lab


# ----------------------------------------------------------------------------- kernel
@kernel
@pytest.mark.parametrize("n,vocab,hidden", [(37, 501, 16), (300, 1000, 72)])
@pytest.mark.parametrize("temperature,with_bias", [(1.0, False), (0.7, True)])
def test_kernel_float32_matches_log_softmax(n, vocab, hidden, temperature, with_bias):
    h, w, b, lab = (x.to(DEVICE) for x in head(n, vocab, hidden, seed=n))
    bias = b if with_bias else None
    want = reference(h, lab, w, bias, temperature)
    got = FL.fused_logprobs(h, lab, w, bias, temperature)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_accumulates_in_float32(dtype):
    h, w, b, lab = (x.to(DEVICE) for x in head(70, 700, 64, seed=1))
    hh, wh = h.to(dtype), w.to(dtype)
    want = reference(hh.float(), lab, wh.float(), None, 0.7)   # exact products of the half values, fp32 sums
    got = FL.fused_logprobs(hh, lab, wh, None, 0.7)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@kernel
@pytest.mark.parametrize("tiles", FL.SWEEP[1:], ids=lambda t: t.name)
def test_kernel_other_launch_configurations(tiles):
    """The configurations scripts/bench_output_layer.py --fused-tiles sweep times give the same values (hidden
    size 72: a partial step of every block_k; vocabulary 1000: a partial tile of every block_v)."""
    h, w, b, lab = (x.to(DEVICE) for x in head(150, 1000, 72, seed=5))
    got = FL.fused_logprobs(h, lab, w, b, 0.7, tiles=tiles)
    # log-probs here reach -40 (4 ulp of float32 = 1.5e-5); the summation order differs with the tiles
    torch.testing.assert_close(got, reference(h, lab, w, b, 0.7), atol=1e-5, rtol=1e-6)


@kernel
def test_token_logprobs_with_the_fused_backend(gqa_model, tokenizer):
    model = gqa_model.to(DEVICE)
    seqs, positions = sample_sequences(len(tokenizer), [7, 30, 3, 55, 12, 2, 1, 90])
    want = unpadded_reference(model, seqs, positions, 0.7)
    for packing in ("packed", "padded"):
        got = L.token_logprobs(model, seqs, positions, 0.7, token_budget=64, packing=packing, backend="fused")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- everywhere
def test_plan_fills_the_machine_with_whole_tiles():
    # 37 rows: one block of 64; 1000 columns = 8 tiles < 16 slices wanted -> 8 slices of one tile; group of 1
    assert FL.plan(37, 1000, 4) == (64, 8, 128, 1)
    # 5000 rows: 40 blocks of 128; 528 programs -> 14 slices, raised to 16 -> 75 tiles each (152064 columns
    # = 1188 tiles; 16 x 75 covers them, 16 slices), groups of 16 row blocks
    assert FL.plan(5000, 152064, 528) == (128, 16, 75 * 128, 16)
    # 1000 rows: 8 blocks; 528 programs -> 66 slices of 18 tiles (66 x 18 = 1188); a group = all 8 blocks
    assert FL.plan(1000, 152064, 528) == (128, 66, 18 * 128, 8)
    assert FL.plan(1, 100, 4) == (16, 1, 128, 1)              # one tile: one slice
    assert FL.plan(5000, 1000, 528, min_splits=2) == (128, 8, 128, 2)   # 8 tiles: 8 slices
    # tiles of 256 columns: 152064 -> 594 tiles, 16 slices of 38 tiles (16 x 38 = 608 >= 594)
    assert FL.plan(5000, 152064, 528, block_v=256) == (128, 16, 38 * 256, 16)


def test_tiles_names_and_refusals():
    assert [t.name for t in FL.SWEEP] == ["128x64w8", "128x64w4s4", "256x64w8", "128x128w8s2", "256x32w8s4"]
    assert all(FL.Tiles.parse(t.name) == t for t in FL.SWEEP)
    assert FL.kernel_settings(torch.bfloat16, False, 128)["num_stages"] == 3       # defaults by dtype
    assert FL.kernel_settings(torch.float32, False, 128)["num_stages"] == 2
    assert FL.kernel_settings(torch.float32, False, 128, FL.Tiles(num_stages=4))["num_stages"] == 4
    for bad in ("128x64", "96x64w8", "128x8w8", "128x64w0", "128x64w8s0", "128x64w3", "big"):
        with pytest.raises(ValueError, match="expected VxKwW or VxKwWsS"):
            FL.Tiles.parse(bad)


@kernel
def test_kernel_program_groups_cover_every_row_and_slice():
    """3 row blocks in groups of 2 (the last group partial) x 2 slices of 2 and 1 tiles: every row scored once."""
    h, w, b, lab = (x.to(DEVICE) for x in head(300, 384, 32, seed=3))
    block_n, splits, _, group = FL.plan(300, 384, FL._programs_wanted(torch.device(DEVICE)), min_splits=2)
    assert (block_n, group) == (128, 2) and splits >= 2      # 3 row blocks: groups of 2 and 1
    got = FL.fused_logprobs(h, lab, w, b, 0.7, min_splits=2)
    torch.testing.assert_close(got, reference(h, lab, w, b, 0.7), atol=1e-5, rtol=0)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter compiles nothing")
@pytest.mark.parametrize("arch,dtype,bias,tiles", [(90, torch.bfloat16, False, FL.Tiles()),
                                                   (80, torch.bfloat16, False, FL.Tiles()),
                                                   (90, torch.float32, True, FL.Tiles())]
                         + [(90, torch.bfloat16, False, t) for t in FL.SWEEP[1:]],
                         ids=lambda x: x.name if isinstance(x, FL.Tiles) else str(x))
def test_compiles_for_hopper_and_ampere_gpus(arch, dtype, bias, tiles, tmp_path, monkeypatch):
    """The kernel as a launch at 7B shape would specialise it, compiled to a cubin here (triton's own ptxas, no
    GPU): the K loop is software-pipelined (cp.async), bf16 uses the tensor cores (wgmma on Hopper, mma on
    Ampere), and shared memory stays within the card's limit (H100: 227 KB, A100: 163 KB per block). The default
    launch for both cards and dtypes; the other configurations of the sweep for the H100."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    fn = FL._lse_pick_kernel
    settings = FL.kernel_settings(dtype, bias, block_n=128, tiles=tiles)
    options = {k: settings.pop(k) for k in list(settings) if k not in fn.arg_names}   # launch options
    ptr = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    kinds = {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": "*i64", "inv_t": "fp32"}
    signature = {a: "constexpr" if a in settings else kinds.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    # what a launch sees at 7B shape: 16-byte aligned pointers; V, H, strides and slice widths divisible by 16
    aligned = [a for a in fn.arg_names if a.endswith("_ptr")] + ["V", "H", "stride_h", "stride_w", "v_per_split"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=settings, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    assert "cp.async" in ptx
    if dtype == torch.bfloat16:
        assert ("wgmma.mma_async" if arch == 90 else "mma.sync") in ptx
    assert kernel.metadata.shared <= {90: 227, 80: 163}[arch] * 1024


@pytest.mark.cuda
def test_teacher_reward_with_the_fused_backend(reward_setup, tokenizer):
    """The reward through the fused kernel equals the other backends' (a GPU, or the interpreter, needed)."""
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.teacher_reward import TeacherReward

    fmt, teacher, student, items = reward_setup
    if not (torch.cuda.is_available() or INTERPRETED):
        with pytest.raises(ConfigError, match="reward_logprob_backend=fused runs on CUDA"):
            _reward(reward_setup, tokenizer, reward_logprob_backend="fused")
        with pytest.raises(ConfigError, match="reward_logprob_backend=fused runs on CUDA"):
            L.resolve_backend("fused", torch.device("cpu"))
        return
    if DEVICE == "cuda":
        teacher, student = (copy.deepcopy(m).to(DEVICE) for m in (teacher, student))

    def score(backend):
        cfg = RewardConfig(reward_logprob_backend=backend)
        return TeacherReward(student, tokenizer, fmt, cfg, teacher_temperature=0.7)(teacher, items)

    base, got = score("rowchunk" if DEVICE == "cuda" else "online"), score("fused")
    torch.testing.assert_close(got.rewards, base.rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.components["r_kl"], base.components["r_kl"], atol=1e-5, rtol=0)


@pytest.mark.skipif(INTERPRETED, reason="this is the parent run")
def test_interpreter_runs_the_fused_tests():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "kernel_ or with_the_fused_backend"],
                       env=env, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) == KERNEL_TESTS + 1, tail   # + the reward test
    assert "skipped" not in r.stdout, tail


"""Output-layer log-probs fused into one Triton kernel: the ``fused`` reward backend (CUDA).

For each row n: lp[n] = z[n, y_n] / t - logsumexp_v(z[n, v] / t) with z = h W^T + b. Each program owns
``BLOCK_N`` rows and a slice of the vocabulary; per [BLOCK_N, BLOCK_V] tile it runs the GEMM over the hidden
size with float32 accumulation and folds the tile straight into a running max / sum of exponentials and the
picked logit, so no logit ever goes to memory and nothing is rounded to the model's dtype. The vocabulary
slices' partial results ([splits, N] float32 each) are merged by one logsumexp afterwards. Programs are
ordered in groups (row blocks x slices, as in a grouped GEMM) so the hidden rows and weight tiles in use at
one time stay in L2: at 7B shape one row block or weight tile is 0.9 MB, a group of 16 x 16 about 30 MB.

Liger's fused linear cross-entropy was the first candidate (issue 13); it does not fit: it writes each chunk's
logits in the input dtype (bf16 rounding of values around 10-30 before the logsumexp) and allocates gradient
buffers, whereas the reward wants float32 logits and no gradients.

Importing this module imports triton. Under ``TRITON_INTERPRET=1`` (set before the import) the kernel runs on
CPU tensors through triton's interpreter: that is how the CPU tests check it; there half-precision tiles are
upcast before ``tl.dot`` (the interpreter's half-precision dot is wrong), on a GPU they go to the tensor cores.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MIN_SPLITS = 16  # vocabulary slices (and row blocks per program group): 16 x 16 tiles of 7B shape fit in L2


@dataclass(frozen=True)
class Tiles:
    """How the kernel cuts its work: ``block_v`` vocabulary columns per tile, the tile GEMM steps ``block_k``
    through the hidden size, ``num_warps`` warps per program, ``num_stages`` software-pipeline stages (None:
    3 in half precision, 2 in float32). The defaults are the backend's; others are for measuring
    (``scripts/bench_output_layer.py --fused-tiles``)."""
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int | None = None

    @property
    def name(self) -> str:
        return f"{self.block_v}x{self.block_k}w{self.num_warps}" + (f"s{self.num_stages}" if self.num_stages else "")

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """``VxKwW[sS]`` (as :attr:`name` writes it), e.g. ``256x64w8s3``; one line naming the form otherwise."""
        m = re.fullmatch(r"(\d+)x(\d+)w(\d+)(?:s(\d+))?", text.strip())
        v, k, w = (int(g) for g in m.groups()[:3]) if m else (0, 0, 0)
        powers = all(x & (x - 1) == 0 for x in (v, k, w))
        if not m or not powers or min(v, k) < 16 or w < 1 or (m.group(4) and int(m.group(4)) < 1):
            raise ValueError(f"fused tiles {text!r}: expected VxKwW or VxKwWsS with powers of two V, K >= 16 "
                             "and W (warps), S >= 1 stages, e.g. 128x64w8s3")
        return cls(v, k, w, int(m.group(4)) if m.group(4) else None)


# Launch configurations worth timing on a new card (half precision), the default first. Larger tiles trade
# registers and shared memory (256x64 with 3 stages: 144 KB) for fewer weight reads.
SWEEP = (Tiles(), Tiles(num_warps=4, num_stages=4), Tiles(block_v=256), Tiles(block_k=128, num_stages=2),
         Tiles(block_v=256, block_k=32, num_stages=4))


def interpreting() -> bool:
    """Whether triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    knobs = getattr(triton, "knobs", None)   # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# N, splits and group_rows change from call to call; specialising on them (divisible by 16 or not, equal to 1)
# would compile new variants mid-run.
@triton.jit(do_not_specialize=["N", "splits", "group_rows"])
def _lse_pick_kernel(h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, p_ptr,
                     N, V, H, stride_h, stride_w, v_per_split, splits, group_rows, inv_t,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial (max, sum of exp, picked logit) of one row block over one vocabulary slice.

    Programs run in groups of ``group_rows`` row blocks x all slices (row block fastest), so the programs
    resident at one time share a few row blocks and a few weight tiles, both held in L2.
    """
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = group_rows * splits
    first = (pid // per_group) * group_rows
    size = tl.minimum(row_blocks - first, group_rows)
    pid_n = first + (pid % per_group) % size
    split = (pid % per_group) // size
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    y = tl.load(y_ptr + rn, mask=row_ok, other=-1)
    h_rows = h_ptr + rn.to(tl.int64)[:, None] * stride_h
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    picked = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        col_ok = rv < v_hi
        w_rows = w_ptr + rv.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + rk) < H
            h = tl.load(h_rows + (k0 + rk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + (k0 + rk)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc += tl.dot(h, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(h, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rv, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = acc * inv_t
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        picked += tl.sum(tl.where(rv[None, :] == y[:, None], acc, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(acc, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m = m_new
    out = split.to(tl.int64) * N + rn
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(p_ptr + out, picked, mask=row_ok)


@functools.lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """About four programs per streaming multiprocessor (the interpreter: a handful)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def plan(n_rows: int, vocab: int, programs: int, min_splits: int = MIN_SPLITS,
         block_v: int = Tiles.block_v) -> tuple[int, int, int, int]:
    """(BLOCK_N, slices, columns per slice, row blocks per group) for ``n_rows`` rows over ``vocab`` columns
    in tiles of ``block_v`` columns.

    Rows go 128 to a program (down to 16 for few rows). The vocabulary is cut into whole-tile slices: at least
    ``min_splits`` of them (so a group of row blocks x slices shares weight tiles in L2), more when that many
    row blocks would give fewer than ``programs`` programs, never more than there are tiles. A group holds
    ``min_splits`` row blocks (fewer when there are fewer).
    """
    block_n = 128 if n_rows > 64 else max(16, triton.next_power_of_2(n_rows))
    row_blocks = triton.cdiv(n_rows, block_n)
    tiles = triton.cdiv(vocab, block_v)
    splits = max(1, min(tiles, max(min_splits, triton.cdiv(programs, row_blocks))))
    per_split = triton.cdiv(tiles, splits) * block_v
    return block_n, triton.cdiv(vocab, per_split), per_split, min(min_splits, row_blocks)


def kernel_settings(dtype: torch.dtype, has_bias: bool, block_n: int, tiles: Tiles = Tiles()) -> dict:
    """The kernel's compile-time arguments and launch options for ``dtype`` inputs (one place: launches and the
    compile test use it). Half precision: tensor-core dots (default 3 pipeline stages, 96 KB of shared memory);
    float32: exact (``ieee``) dots (default 2 stages, 128 KB). Multiply-adds are fused (FMA) by choice, not by
    triton's default, which changes in triton 3.10."""
    half = dtype in (torch.float16, torch.bfloat16)
    stages = tiles.num_stages or (3 if half else 2)
    return dict(HAS_BIAS=has_bias, UPCAST=half and interpreting(), IEEE=dtype == torch.float32, BLOCK_N=block_n,
                BLOCK_V=tiles.block_v, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=stages,
                enable_fp_fusion=True)


def fused_logprobs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float, min_splits: int = MIN_SPLITS, tiles: Tiles = Tiles()) -> torch.Tensor:
    """log softmax(h W^T / temperature)[label]. hidden [N, H], labels [N], weight [V, H] -> [N] float32.

    ``min_splits``: see :func:`plan`; ``tiles``: see :class:`Tiles`.
    """
    n, hid = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hid or labels.shape != (n,):
        raise ValueError(f"fused_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)} do not match ([N, H], [V, H], [N])")
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    hidden = hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    block_n, splits, per_split, group = plan(n, vocab, _programs_wanted(hidden.device), min_splits, tiles.block_v)
    m, s, p = (torch.empty(splits, n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    _lse_pick_kernel[(triton.cdiv(n, block_n) * splits,)](
        hidden, weight, bias if bias is not None else hidden, labels.contiguous(), m, s, p,
        n, vocab, hid, hidden.stride(0), weight.stride(0), per_split, splits, group, 1.0 / temperature,
        **kernel_settings(hidden.dtype, bias is not None, block_n, tiles))
    torch.sub(p.sum(0), torch.logsumexp(m + s.log(), dim=0), out=out)
    return out

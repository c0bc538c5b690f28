"""Pure tensor operations of the teacher reward.

Shapes: B = completions, T = (left-aligned) span length, R = reductions.
Values outside ``mask`` are ignored; a row whose mask is empty reduces to NaN
(every reduction), which the reward later replaces by a penalty.
"""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "min", "max", "median", "first_quartile", "last_quartile")
NORMALIZERS = (None, "none", "exp", "exp_norm")


def normalize(x: torch.Tensor, fn: str | None) -> torch.Tensor:
    """Elementwise transform: None/"none" identity, "exp" e^x, "exp_norm" 1 - e^(-x). [B, T] -> [B, T]."""
    if fn in (None, "none"):
        return x
    if fn == "exp":
        return torch.exp(x)
    if fn == "exp_norm":
        return 1.0 - torch.exp(-x)
    raise ValueError(f"unknown normalizer {fn!r}; expected one of {NORMALIZERS}")


def masked_reduce(x: torch.Tensor, mask: torch.Tensor, op: str) -> torch.Tensor:
    """Reduce each row of x over its mask. x, mask: [B, T] -> [B]; empty rows give NaN.

    median is the lower middle value (torch.nanmedian); quartiles interpolate
    linearly (torch.nanquantile at 0.25 / 0.75).
    """
    mask = mask.bool()
    x = x.float()
    count = mask.sum(-1)
    empty = count == 0
    nan = torch.full(x.shape[:-1], float("nan"), device=x.device)
    if x.shape[-1] == 0:
        return nan
    if op == "mean":
        out = torch.where(mask, x, 0.0).sum(-1) / count.clamp(min=1)
    elif op == "sum":
        out = torch.where(mask, x, 0.0).sum(-1)
    elif op == "min":
        out = torch.where(mask, x, float("inf")).amin(-1)
    elif op == "max":
        out = torch.where(mask, x, float("-inf")).amax(-1)
    elif op in ("median", "first_quartile", "last_quartile"):
        filled = torch.where(mask, x, float("nan"))
        if op == "median":
            out = filled.nanmedian(-1).values
        else:
            out = filled.nanquantile(0.25 if op == "first_quartile" else 0.75, dim=-1)
    else:
        raise ValueError(f"unknown reduction {op!r}; expected one of {REDUCTIONS}")
    return torch.where(empty, nan, out)


def reduce_all(x: torch.Tensor, mask: torch.Tensor, ops: list[str]) -> torch.Tensor:
    """Stack each reduction: [B, T] -> [B, R]."""
    return torch.stack([masked_reduce(x, mask, op) for op in ops], dim=-1)


def weighted_scores(scores: torch.Tensor, coeffs: torch.Tensor, nan_fill: float) -> torch.Tensor:
    """NaN -> nan_fill, then dot with coeffs. scores [B, R], coeffs [R] -> [B]."""
    return (torch.nan_to_num(scores, nan=nan_fill) * coeffs.to(scores)).sum(-1)


def kl_estimate(teacher_lp: torch.Tensor, student_lp: torch.Tensor, schulman: bool = False) -> torch.Tensor:
    """Per-token KL estimate from samples of the teacher. [B, T] -> [B, T].

    k1: log p_T - log p_S. With ``schulman``: k1 - 1 + exp(-k1) (k3, non-negative).
    """
    kl = teacher_lp - student_lp
    if schulman:
        kl = kl - 1.0 + torch.exp(-kl)
    return kl

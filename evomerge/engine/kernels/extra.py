"""Kernels of the methods mergekit 0.1.5 added beside the classic ones: nearswap, arcee_fusion, ram
and ramplus_tl. Whole-tensor torch code after mergekit's formulas; each takes the inputs of one
output tensor (compute dtype, same shape) and returns the merged tensor.

All four are deterministic. The one data-dependent shortcut mergekit takes is arcee_fusion's: on a
tensor of more than a million entries it estimates the quartiles of the importance scores from a
random sample of a million entries (torch's global generator); here the quartiles are exact on
every tensor, so the result does not depend on a generator's state (on small tensors both are the
same order statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from evomerge.engine.inputs import TensorInputs
from evomerge.engine.kernels.common import base_of

__all__ = ["EXTRA_KERNELS"]


def _base_and_others(inp: TensorInputs) -> tuple[int, list[int]]:
    b = base_of(inp)
    return b, [i for i in range(len(inp)) if i != b]


def _nearswap(inp: TensorInputs) -> torch.Tensor:
    """Take the other model's value where it is within ``t`` of the base; elsewhere move towards it
    by ``t / |a - b|`` (so entries far from the base stay close to the base)."""
    b, (other,) = _base_and_others(inp)
    a, x = inp.tensor(b), inp.tensor(other)
    # |a - b| floored at 1e-6 (mergekit's floor), so equal entries give weight 1 (and stay equal).
    w = (inp.shared["t"] / (a - x).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * a


def _quartiles(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order statistics at positions floor(q * (n - 1)) of the sorted scores, q = 1/4, 1/2, 3/4."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    # kthvalue is 1-based; (last * q) is exact in integers, where mergekit's float32 product is
    # exact too for the at most a million entries it sorts.
    q1, median, q3 = (
        torch.kthvalue(flat, k + 1).values for k in (last // 4, last // 2, 3 * last // 4)
    )
    return q1, median, q3


def _arcee_fusion(inp: TensorInputs) -> torch.Tensor:
    """Keep the other model's change only where it matters most: importance = |delta| times the KL
    divergence of the row softmaxes (other model against base, per row of the last axis); changes
    with importance >= median + 1.5 * IQR over the tensor are kept, the rest revert to the base.

    The mask is a threshold on values that rounding moves across it: it is computed in
    ``inp.decision_dtype`` (the dtype mergekit computes in, bfloat16 for most recipes), op for op
    as mergekit does, so both keep the same entries; the kept changes are added in float32.
    """
    b, (other,) = _base_and_others(inp)
    base = inp.tensor(b)
    if base.numel() == 0:
        return base.clone()
    y, x = inp.raw(b).to(inp.decision_dtype), inp.raw(other).to(inp.decision_dtype)
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(y, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1): one divergence per row
    importance = (x - y).abs() * kl
    del p, q, kl, x, y
    q1, median, q3 = _quartiles(importance)
    keep = importance >= median + 1.5 * (q3 - q1)
    return base + inp.delta(other) * keep.to(base.dtype)


def _ram_parts(inp: TensorInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors zeroed where unchanged, and who changed what.

    Returns:
        ``(kept, changed, count, base)``: ``kept`` (n, P) the flattened task vectors with entries
        |delta| <= epsilon set to 0; ``changed`` (n, P) where |delta| > epsilon; ``count`` (1, P)
        how many models changed each entry; the base tensor.
    """
    b, others = _base_and_others(inp)
    base = inp.tensor(b)
    deltas = torch.stack([inp.delta(i).reshape(-1) for i in others])  # (n, P)
    changed = deltas.abs() > inp.shared["epsilon"]
    count = changed.sum(dim=0, keepdim=True)  # (1, P)
    return deltas * changed, changed, count, base


def _ram(inp: TensorInputs) -> torch.Tensor:
    """Each entry: the base plus the mean of the task-vector entries that changed it (|delta| >
    epsilon); an entry only one model changed takes that model's change whole."""
    if len(inp) == 1:
        return inp.tensor(0).clone()
    kept, _, count, base = _ram_parts(inp)
    merged = (kept / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def _ramplus_tl(inp: TensorInputs) -> torch.Tensor:
    """ram, with each model's uniquely changed entries scaled by 1 + r * min(rho, alpha), where rho
    is the model's count of entries it changes together with others over its count of entries only
    it changes, in this tensor (the count below is floored at epsilon)."""
    if len(inp) == 1:
        return inp.tensor(0).clone()
    kept, changed, count, base = _ram_parts(inp)
    unique, shared = count == 1, count > 1  # (1, P)
    n_shared = (changed & shared).sum(dim=1)  # (n,)
    n_unique = (changed & unique).sum(dim=1)  # (n,)
    rho = n_shared / n_unique.clamp(min=inp.shared["epsilon"])
    boost = 1 + inp.shared["r"] * rho.clamp(min=0, max=inp.shared["alpha"])  # (n,)
    merged = torch.where(unique, kept * boost.unsqueeze(-1), kept / count.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


EXTRA_KERNELS: dict[str, Callable[[TensorInputs], torch.Tensor]] = {
    "nearswap": _nearswap,
    "arcee_fusion": _arcee_fusion,
    "ram": _ram,
    "ramplus_tl": _ramplus_tl,
}

"""What the kernels share: the base input, the output buffer and the task-vector combine's scalars."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from evomerge.engine.inputs import TensorInputs

__all__ = ["base_of", "out_tensor", "combine_scalars"]


def base_of(inp: TensorInputs) -> int:
    """The base input's index, for a method that requires a base (checked when the plan is made)."""
    b = inp.base
    assert b is not None
    return b


def out_tensor(inp: TensorInputs, shape: torch.Size) -> torch.Tensor:
    """Where the merged tensor goes: the resident model's parameter when it fits, else a new tensor."""
    out = inp.out
    if out is not None and out.shape == shape and out.is_contiguous():
        return out
    return torch.empty(shape, dtype=inp.out_dtype, device=inp.raw(0).device)


def combine_scalars(
    inp: TensorInputs, others: list[int], l1: list[tuple[float, float]] | None
) -> tuple[list[float], list[float], float]:
    """The per-tensor scalars of the task-vector combine, shared by the chunked and compiled kernels.

    Args:
        inp: the inputs.
        others: the inputs that are not the base.
        l1: per input ``(L1(delta), L1(kept delta))`` when rescaling, else None.

    Returns:
        ``(weights, coefficients, flat divisor)``: each coefficient is the weight times the L1
        rescale factor (1 where either norm is below 1e-7, mergekit's rule); the divisor of the
        combine without sign consensus is the sum of the weights when normalizing (1 when that sum
        is 0), else 1.
    """
    weights = [float(inp.per_input[i]["weight"]) for i in others]
    eps = 1e-7
    scales = (
        [1.0] * len(others)
        if l1 is None
        else [1.0 if before < eps or after < eps else before / after for before, after in l1]
    )
    total_w = sum(weights)
    flat_div = total_w if inp.shared["normalize"] and abs(total_w) >= 1e-8 else 1.0
    return weights, [w * r for w, r in zip(weights, scales, strict=False)], flat_div

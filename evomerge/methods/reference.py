"""Reference formulas of the merge methods: pure tensor functions, used by the kernels and the tests.

Everything is in torch on the inputs' device; no numpy round trips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["slerp_tensors", "sign_consensus"]


def slerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two tensors, each taken as one flattened vector.

    Interpolates the raw vectors (not their unit directions) with the angle between them; falls
    back to linear interpolation when they are nearly collinear (|cos| > ``dot_threshold``).

    Example:
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> slerp_tensors(0.5, a, b)
        tensor([0.7071, 0.7071])
    """
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    n0 = n0 if n0 > eps else torch.ones_like(n0)
    n1 = n1 if n1 > eps else torch.ones_like(n1)
    dot = (torch.dot(v0.reshape(-1), v1.reshape(-1)) / (n0 * n1)).clamp(-1.0, 1.0).item()
    if abs(dot) > dot_threshold:
        return torch.lerp(v0, v1, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    c0 = math.sin((1 - t) * theta) / sin_theta
    c1 = math.sin(t * theta) / sin_theta
    return v0 * c0 + v1 * c1


def sign_consensus(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: +1 where the sum of the weighted deltas is >= 0, else -1."""
    total = torch.zeros_like(weighted_deltas[0])
    for d in weighted_deltas:
        total.add_(d)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)

"""Keep rules: which entries of one input's task vector ``d`` the task-vector combine keeps.

A sparsifier (:class:`~evomerge.methods.spec.Sparsifier`) turns each input into one rule; the
chunked kernels apply it chunk by chunk, the compiled ones over the whole tensor. A rule holds no
chunk of its own: positions are flat indices into the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KeepAll", "KeepAbove", "KeepRandom", "KeepMask", "KeepRule"]


@dataclass(frozen=True, eq=False)
class KeepAll:
    """Every entry (no sparsifier, a density of 1, or a top k as large as the tensor)."""


@dataclass(frozen=True, eq=False)
class KeepAbove:
    """The entries with ``|d| > threshold``, and those at the flat positions ``extra``.

    The exact top k by ``|d|``: when every entry tied with the k-th largest fits in the k,
    ``threshold`` is the largest value below it and ``extra`` is None; otherwise ``threshold`` is
    the k-th largest itself and ``extra`` (ascending, int64) the tied entries kept, the first ones
    in index order.
    """

    threshold: float
    extra: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class KeepRandom:
    """The entries where the input's fixed U[0, 1) field is below ``p`` (Bernoulli(p): DARE).

    The field (:mod:`evomerge.engine.rng`) is ``field`` when it was drawn, else computed chunk
    by chunk from stream 2's ``keys``.
    """

    p: float
    field: torch.Tensor | None = None
    keys: tuple[int, int] = (0, 0)


@dataclass(frozen=True, eq=False)
class KeepMask:
    """The entries where ``mask`` (bool, the shape of ``d``) is set."""

    mask: torch.Tensor


KeepRule = KeepAll | KeepAbove | KeepRandom | KeepMask

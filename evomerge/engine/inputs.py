"""The inputs of one output tensor, as a merge kernel sees them.

:class:`TensorInputs` hands a kernel its tensors (float32, same shape, on the merge device), the
resolved parameters, and three derived quantities that cost real time on large tensors:

- ``delta(i)``: input ``i`` minus the base (a task vector);
- ``kth_largest_abs_delta(i, k)``: the exact k-th largest ``|delta|``, the TIES threshold;
- ``uniform(i)``: a fixed field of U[0, 1) numbers, keyed by ``(seed, tensor name, input index)``,
  from which every random mask (DARE, DELLA) is drawn as ``uniform < p``.

When merging to disk nothing outlives one tensor. When the search re-merges the same sources
trial after trial, a :class:`PrepCache` keeps these quantities, so a new trial costs a lookup for
the threshold and one pass over the deltas. Both paths compute the same numbers the same way,
which is what lets an exported recipe re-merge to the same tensors.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["TensorInputs", "PrepCache", "kth_largest", "uniform_field", "stream_seed"]

# Random fields are generated in fixed blocks, each from its own seed, so that the numbers do not
# depend on how (or on which device) the field is later consumed.
_BLOCK = 1 << 20


def stream_seed(*key: object) -> int:
    """A 63-bit seed from a key, stable across processes and platforms (unlike ``hash``)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniform_field(seed: int, name: str, index: int, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
    """U[0, 1) numbers for input ``index`` of tensor ``name``; the same on every run and device.

    Example:
        >>> a = uniform_field(0, "model.layers.0.mlp.up_proj.weight", 1, torch.Size([3, 4]))
        >>> torch.equal(a, uniform_field(0, "model.layers.0.mlp.up_proj.weight", 1, torch.Size([3, 4])))
        True
    """
    n = 1
    for s in shape:
        n *= s
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, _BLOCK):
        g = torch.Generator().manual_seed(stream_seed("uniform", seed, name, index, start // _BLOCK))
        stop = min(n, start + _BLOCK)
        torch.rand(stop - start, generator=g, out=out[start:stop])
    return out.reshape(shape).to(device)


def kth_largest(absx: torch.Tensor, k: int) -> float:
    """The exact k-th largest value of a non-negative tensor (1 <= k <= numel).

    Brackets the answer with a strided sample, counts what lies above the bracket and selects
    within it; falls back to a full ``kthvalue`` when the bracket misses. Several times faster than
    ``kthvalue`` (and far faster than a sort) on large tensors, with the same result.
    """
    flat = absx.reshape(-1)
    n = flat.numel()
    if n <= 1 << 16:
        return float(torch.kthvalue(flat, n - k + 1).values)
    stride = max(1, n // 65536)
    sample = flat[::stride]
    m = sample.numel()
    q = (n - k) / n  # quantile of the answer among all values, ascending
    margin = 6.0 / m**0.5 + 2.0 / m
    lo_i = max(1, min(m, int((q - margin) * m)))
    hi_i = max(1, min(m, int((q + margin) * m) + 1))
    lo = float(torch.kthvalue(sample, lo_i).values) if q - margin > 0 else 0.0
    hi = float(torch.kthvalue(sample, hi_i).values) if q + margin < 1 else float("inf")
    above = int((flat > hi).sum()) if hi != float("inf") else 0
    need = k - above  # rank of the answer among the values in [lo, hi], from the top
    if need >= 1:
        cand = flat[(flat >= lo) & (flat <= hi)]
        if need <= cand.numel():
            return float(torch.kthvalue(cand, cand.numel() - need + 1).values)
    return float(torch.kthvalue(flat, n - k + 1).values)


class PrepCache:
    """Per-source precomputation kept across merges, bounded in bytes (least recently used goes).

    Args:
        max_bytes: budget for cached tensors; 0 disables caching.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return t

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = value
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class TensorInputs:
    """Inputs and resolved parameters of one output tensor.

    Args:
        name: the output tensor's name (keys the random fields).
        tensors: input tensors in merge order, float32 (float64 kept), same shape and device.
        keys: a hashable identity per input (model and input tensor name) for the cache.
        base: index of the base input, or None.
        shared: resolved shared parameters.
        per_input: resolved per-input parameters, one mapping per input.
        seed: the merge seed.
        cache: optional :class:`PrepCache` shared across merges.
    """

    def __init__(
        self,
        name: str,
        tensors: Sequence[torch.Tensor],
        keys: Sequence[Hashable],
        base: int | None,
        shared: Mapping[str, Any],
        per_input: Sequence[Mapping[str, Any]],
        seed: int = 0,
        cache: PrepCache | None = None,
        *,
        compute_dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> None:
        self.name = name
        self._raw = list(tensors)
        self._tensors: list[torch.Tensor | None] = [None] * len(self._raw)
        self.keys = list(keys)
        self.base = base
        self.shared = shared
        self.per_input = per_input
        self.seed = seed
        self.cache = cache
        self.compute_dtype = compute_dtype
        self.out_dtype = out_dtype or compute_dtype
        # Where a fused kernel may write its result directly (a resident model's parameter).
        self.out = out if (out is not None and out.dtype == self.out_dtype) else None
        self._memo: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._raw)

    def raw(self, i: int) -> torch.Tensor:
        """Input ``i`` as loaded (its stored dtype, or the compute dtype when resident); do not modify."""
        return self._raw[i]

    def tensor(self, i: int) -> torch.Tensor:
        """Input ``i`` in the compute dtype (converted on first use); do not modify."""
        t = self._tensors[i]
        if t is None:
            t = self._raw[i].to(self.compute_dtype)
            self._tensors[i] = t
        return t

    def _cached(self, key: Hashable, make: Any) -> torch.Tensor:
        if key in self._memo:
            return self._memo[key]
        value = self.cache.get(key) if self.cache is not None else None
        if value is None:
            value = make()
            if self.cache is not None:
                self.cache.put(key, value)
        self._memo[key] = value
        return value

    def delta(self, i: int) -> torch.Tensor:
        """Input ``i`` minus the base (do not modify it in place)."""
        b = self.base
        if b is None:
            raise ValueError("delta() needs a base input")
        return self._cached(("delta", self.keys[i], self.keys[b]), lambda: self.tensor(i) - self.tensor(b))

    def kth_largest_abs_delta(self, i: int, k: int) -> float:
        """The exact k-th largest |delta(i)|."""
        return self.magnitude_threshold(i, k)[0]

    def magnitude_threshold(self, i: int, k: int) -> tuple[float, torch.Tensor | None]:
        """TIES threshold for input ``i``: the k-th largest ``|delta(i)|``.

        Returns:
            ``(threshold, mask)``: ``mask`` is None when exactly k entries are >= the threshold;
            otherwise (ties at the threshold) it is the boolean mask of exactly k entries, ties
            kept in index order.
        """
        b = self.base
        if b is None:
            raise ValueError("magnitude_threshold() needs a base input")
        if self.cache is not None:
            # Resident: keep |delta| sorted once; every later density is an index lookup.
            ordered = self._cached(
                ("sorted_abs", self.keys[i], self.keys[b]),
                lambda: torch.sort((self.tensor(i) - self.tensor(b)).abs_().reshape(-1)).values,
            )
            n = ordered.numel()
            thr = ordered[n - k]
            n_ge = n - int(torch.searchsorted(ordered, thr, right=False))
            if n_ge == k:
                return float(thr), None
            absd = (self.tensor(i) - self.tensor(b)).abs_()
            return float(thr), _keep_top_k(absd, k, float(thr))
        from evomerge.engine.fused import abs_delta

        absd = abs_delta(self, i)
        thr = kth_largest(absd, k)
        if int((absd >= thr).sum()) == k:
            return thr, None
        return thr, _keep_top_k(absd, k, thr)

    def uniform(self, i: int) -> torch.Tensor:
        """The fixed U[0, 1) field of input ``i`` (see :func:`uniform_field`)."""
        t = self._raw[i]
        return self._cached(
            ("uniform", self.seed, self.name, i, tuple(t.shape)),
            lambda: uniform_field(self.seed, self.name, i, t.shape, t.device),
        )


def _keep_top_k(absx: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """Boolean mask of exactly k largest entries; ties at the threshold are kept in index order."""
    mask = absx > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        # Only the tied entries are indexed (bf16 deltas tie often; a cumsum over all would cost more).
        tied = torch.nonzero((absx == threshold).reshape(-1)).reshape(-1)[:missing]
        mask.view(-1)[tied] = True
    return mask

"""The inputs of one output tensor, as a merge kernel sees them.

:class:`TensorInputs` hands a kernel its tensors (float32, same shape, on the merge device), the
resolved parameters, and three derived quantities that cost real time on large tensors:

- ``delta(i)``: input ``i`` minus the base (a task vector);
- ``magnitude_rule(i, k)``: how to keep the exact top k entries of ``|delta|`` (TIES);
- ``uniform(i)``: a fixed field of U[0, 1) numbers, keyed by ``(seed, tensor name, input index)``,
  from which every random mask (DARE, DELLA) is drawn as ``uniform < p`` (see :mod:`evomerge.engine.rng`;
  ``random_rule(i, p)`` hands the fused kernels the stream's keys instead of a field).

When merging to disk nothing outlives one tensor. When the search re-merges the same sources
trial after trial, a :class:`PrepCache` keeps these quantities (a revisited density costs a
lookup for its threshold; stream 1's random fields are drawn once, stream 2's cost nothing to redraw). Both paths compute the same numbers the same way,
which is what lets an exported recipe re-merge to the same tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

import torch

from evomerge.engine.kernels.chunked import magnitude_rule, rule_from_order
from evomerge.engine.kernels.rules import KeepAbove, KeepAll, KeepRandom
from evomerge.engine.rng import STREAM, check_stream, stream_keys, stream_seed, uniform_field

__all__ = ["TensorInputs", "PrepCache", "uniform_field", "stream_seed"]


def _nbytes(value: Any) -> int:
    """Bytes held by a cached value: a tensor, a keep rule, or a tuple of tensors and numbers."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if is_dataclass(value):
        value = tuple(getattr(value, f.name) for f in fields(value))
    if isinstance(value, tuple):
        return 64 + sum(_nbytes(v) for v in value)
    return 64


class PrepCache:
    """Per-source precomputation kept across merges, bounded in bytes (least recently used goes).

    Args:
        max_bytes: budget for cached tensors; 0 disables caching.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._seen: dict[Hashable, int] = {}

    def seen(self, key: Hashable) -> int:
        """Count one more request of ``key`` (a bookkeeping key, holding nothing); return the count."""
        self._seen[key] = self._seen.get(key, 0) + 1
        return self._seen[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the budget without evicting anything."""
        return self.bytes + nbytes <= self.max_bytes

    def get(self, key: Hashable) -> Any:
        t = self._items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return t

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        while self._items and self.bytes + size > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)
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
        compute_dtype: the dtype kernels compute in.
        out_dtype: the dtype of the result (default: ``compute_dtype``).
        decision_dtype: the dtype mergekit computes this tensor in (default: ``compute_dtype``);
            a kernel makes a discrete choice that rounding can flip in it (see
            :class:`~evomerge.engine.plan.TensorTask`).
        out: where a kernel may write its result (used when shape and dtype match).
        compiled: let kernels use compiled code for large tensors (resident re-merges).
        stream: the random stream of masks (:data:`evomerge.engine.rng.STREAMS`).
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
        decision_dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        compiled: bool = False,
        stream: int = STREAM,
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
        self.decision_dtype = decision_dtype or compute_dtype
        # Where a fused kernel may write its result directly (a resident model's parameter).
        self.out = out if (out is not None and out.dtype == self.out_dtype) else None
        self._memo: dict[Hashable, Any] = {}
        # Set by the fused kernels, which check their output chunk by chunk: True, False, or None
        # when the kernel did not check (the caller then checks the whole result).
        self.finite: bool | None = None
        # Whether kernels may use compiled code (see :mod:`evomerge.engine.kernels.compiled`): worth it only
        # when the same tensors are merged again and again.
        self.compiled = compiled
        self.stream = check_stream(stream)

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

    def _cached(self, key: Hashable, make: Any, *, evict: bool = True) -> Any:
        if key in self._memo:
            return self._memo[key]
        value = self.cache.get(key) if self.cache is not None else None
        if value is None:
            value = make()
            if self.cache is not None and (evict or self.cache.room(_nbytes(value))):
                self.cache.put(key, value)
        self._memo[key] = value
        return value

    def delta(self, i: int) -> torch.Tensor:
        """Input ``i`` minus the base (do not modify it in place)."""
        b = self.base
        if b is None:
            raise ValueError("delta() needs a base input")
        return self._cached(
            ("delta", self.keys[i], self.keys[b]), lambda: self.tensor(i) - self.tensor(b)
        )

    def magnitude_rule(self, i: int, k: int) -> KeepAll | KeepAbove:
        """Keep rule for the exact top ``k`` entries of ``|delta(i)|`` (see :func:`~evomerge.engine.kernels.chunked.magnitude_rule`).

        Cached per (input, base, k) across merges: a search that revisits a density pays nothing.
        """
        b = self.base
        if b is None:
            raise ValueError("magnitude_rule() needs a base input")
        pair = (self.keys[i], self.keys[b])
        key = ("magnitude", *pair, k)
        if key in self._memo:
            return self._memo[key]
        cache = self.cache
        if cache is None:
            rule = magnitude_rule(self, i, k)
        else:
            # A search varying the density asks for a second k: from then on keep the stable
            # descending order of |delta| (int32, 4 bytes an entry) when it fits the budget, and
            # every later threshold is a few lookups instead of a pass over the tensor.
            order = cache.get(("order", *pair))
            n = self._raw[i].numel()
            if (
                order is None
                and cache.seen(("thresholds", *pair)) >= 2
                and n < 2**31
                and cache.room(4 * n)
            ):
                order = self._magnitude_order(i)
                cache.put(("order", *pair), order)
            if order is not None:
                rule = rule_from_order(self, i, k, order)
            else:
                rule = cache.get(key)
                if rule is None:
                    rule = magnitude_rule(self, i, k)
                    cache.put(key, rule)
        self._memo[key] = rule
        return rule

    def _magnitude_order(self, i: int) -> torch.Tensor:
        """Flat positions by descending ``|delta(i)|``, ties in index order (a stable sort), as int32."""
        b = self.base
        assert b is not None
        absd = (
            self._raw[i].reshape(-1).to(self.compute_dtype)
            - self._raw[b].reshape(-1).to(self.compute_dtype)
        ).abs_()
        if absd.dtype == torch.float32:
            # The bit patterns of non-negative floats sort like their values, and torch sorts int32
            # keys with a radix sort (several times faster than a stable float sort).
            # Ascending keys of (INT32_MAX - bits) give the descending order, ties in index order.
            key = 0x7FFFFFFF - absd.view(torch.int32)
            del absd
            return torch.sort(key, stable=True).indices.to(torch.int32)
        return torch.sort(absd, descending=True, stable=True).indices.to(torch.int32)

    def uniform(self, i: int) -> torch.Tensor:
        """The fixed U[0, 1) field of input ``i`` (see :func:`~evomerge.engine.rng.uniform_field`)."""
        t = self._raw[i]
        if self.stream != 1:  # a few integer ops per entry, on the device: redrawn, not cached
            return uniform_field(self.seed, self.name, i, t.shape, t.device, stream=self.stream)
        # Stream 1 fields are kept only while there is room: drawing one again costs a fraction of
        # rebuilding what it would evict (a sorted order of |delta| costs a sort of the whole tensor).
        return self._cached(
            ("uniform", self.seed, self.name, i, tuple(t.shape)),
            lambda: uniform_field(self.seed, self.name, i, t.shape, t.device, stream=1),
            evict=False,
        )

    def random_rule(self, i: int, p: float) -> KeepRandom:
        """Keep rule for "where input ``i``'s uniform field is below ``p``": with stream 1's field,
        or stream 2's keys, which the fused kernels expand chunk by chunk."""
        if self.stream == 1:
            return KeepRandom(p, self.uniform(i))
        t = self._raw[i]
        cache = self.cache
        if t.device.type == "cpu" and cache is not None:
            # On a CPU the integer hash costs more than reading a field (64-bit multiplies): a
            # resident merger keeps the field while there is room. Same bits either way.
            key = ("uniform", self.seed, self.name, i, tuple(t.shape))
            field = self._memo.get(key)
            if field is None and (key in cache or cache.room(4 * t.numel())):
                field = self._cached(
                    key,
                    lambda: uniform_field(
                        self.seed, self.name, i, t.shape, t.device, stream=self.stream
                    ),
                    evict=False,
                )
            if field is not None:
                return KeepRandom(p, field)
        return KeepRandom(p, keys=stream_keys(self.seed, self.name, i))

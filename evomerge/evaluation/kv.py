"""What the shared-context scorer and the shared-prefix generator need to know about a model's
forward and its key/value cache (``transformers`` only; no lm-eval)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

__all__ = [
    "forward_names",
    "output_cache",
    "cache_rows",
    "cache_cat",
    "cache_length",
    "cache_paddable",
    "growing",
    "GrowingLayer",
    "sliding_window",
]


def forward_names(model: torch.nn.Module) -> tuple[str, str | None]:
    """The forward's name for the cache (``cache`` in transformers 5, ``past_key_values`` before) and
    for the number of logits to keep (None when it takes none).

    Args:
        model: a ``transformers`` causal LM.

    Returns:
        ``(cache argument, logits-to-keep argument or None)``.
    """
    params = inspect.signature(model.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def output_cache(output: Any) -> Any:
    """The cache a forward returned: ``output.cache`` in transformers 5 (where reading
    ``past_key_values`` logs a deprecation line), ``output.past_key_values`` before.

    Args:
        output: a ``transformers`` model output of a forward with ``use_cache=True``.

    Returns:
        The cache (None when the forward returned none).
    """
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A new cache holding rows ``index`` (repeats allowed) of ``cache``; ``cache`` is left as it was
    (a forward appends to its cache's layers by rebinding their tensors, so shallow copies suffice).

    Args:
        cache: a ``transformers`` ``Cache`` with ``layers``.
        index: row indices, on the cache's device.

    Returns:
        The new cache.

    Raises:
        TypeError: a cache without layers (a legacy tuple cache).
    """
    if not hasattr(cache, "layers") or not hasattr(cache, "batch_select_indices"):
        raise TypeError(
            f"the model returned a {type(cache).__name__} cache; the shared-context scorer needs a transformers Cache with layers (use scorer: hflm)"
        )
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(index)
    return out


def cache_length(cache: Any) -> int:
    """The number of key/value columns ``cache`` holds (0 when empty)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_paddable(cache: Any) -> bool:
    """True when every layer of ``cache`` is a plain ``DynamicLayer`` (full attention, one column
    per token) or a :class:`GrowingLayer`, so that :func:`cache_cat` may pad it."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(x) in (DynamicLayer, GrowingLayer) for x in layers)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with room to grow, so
    that appending a token writes into the buffer instead of copying the layer
    (``DynamicLayer`` concatenates: a copy of the whole cache per generated token)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.is_initialized = True
        self.device = keys.device
        self._store(keys, values, 0)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        b, h, n, d = keys.shape
        self._k = keys.new_empty((b, h, n + room, d))  # (B, H, capacity, D)
        self._v = values.new_empty((b, values.shape[1], n + room, values.shape[-1]))
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._view(n)

    def _view(self, n: int) -> None:
        self._n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def _full(self, n: int) -> None:
        # doubling: appends copy the layer O(log length) times
        self._store(
            self._k[:, :, : self._n], self._v[:, :, : self._n], max(n - self._n, self._n, 16)
        )

    def update(self, key_states, value_states, *args, **kwargs):
        n = self._n + key_states.shape[-2]
        if n > self._k.shape[-2]:
            self._full(n)
        self._k[:, :, self._n : n] = key_states
        self._v[:, :, self._n : n] = value_states
        self._view(n)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._view(self._n - abs(tokens_to_remove))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._view(self._n)

    def held(self) -> int:
        """Key/value elements of the buffers (their whole capacity)."""
        return int(self._k.numel() + self._v.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k = self._k.repeat_interleave(repeats, dim=0)
        self._v = self._v.repeat_interleave(repeats, dim=0)
        self._view(self._n)


def growing(cache: Any) -> Any:
    """``cache`` with every plain ``DynamicLayer`` turned into a layer that appends in place (the
    same keys and values, in buffers with room to grow); other caches are returned as they are.

    Args:
        cache: a ``transformers`` ``Cache`` (or None).

    Returns:
        The cache (the same object, its layers replaced).
    """
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(x) is DynamicLayer and x.is_initialized for x in layers):
        return cache
    cache.layers = [GrowingLayer(x.keys, x.values) for x in layers]
    return cache


def cache_cat(a: Any, b: Any) -> Any:
    """A cache holding the rows of ``a`` then the rows of ``b``; the shorter one is padded with zero
    columns at its end, which the caller masks out (keys carry their rotary positions already, so
    a key's column does not matter, only whether the mask lets a query see it).

    Args:
        a, b: caches whose layers are all plain ``DynamicLayer`` (full attention).

    Returns:
        The new cache (``a`` and ``b`` are left as they were).

    Raises:
        TypeError: a layer of either is of another kind (sliding window, static, quantized:
            columns mean something there).
    """
    if not (cache_paddable(a) and cache_paddable(b)) or len(a.layers) != len(b.layers):
        raise TypeError(f"cannot join caches of type {type(a).__name__}")
    width = max(cache_length(a), cache_length(b))

    def grow(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (B, H, width, D)
        return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[-2]))

    out = copy.copy(a)
    out.layers = [
        GrowingLayer(
            torch.cat([grow(la.keys), grow(lb.keys)], dim=0),
            torch.cat([grow(la.values), grow(lb.values)], dim=0),
        )
        for la, lb in zip(a.layers, b.layers, strict=True)
    ]
    return out


def sliding_window(model: torch.nn.Module) -> int | None:
    """The smallest attention window of ``model`` when some layer attends through one, else None.

    Args:
        model: a ``transformers`` causal LM.

    Returns:
        The window in tokens, or None (every layer attends to the whole sequence).
    """
    cfg: Any = getattr(model, "config", None)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return window if any("sliding" in str(t) for t in types) else None
    return window if getattr(cfg, "use_sliding_window", True) else None

"""What the shared-context scorer and the shared-prefix generator need to know about a model's
forward and its key/value cache (``transformers`` only; no lm-eval)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

__all__ = [
    "forward_names",
    "cache_rows",
    "cache_cat",
    "cache_length",
    "cache_paddable",
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
    per token), so that :func:`cache_cat` may pad it."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x) is DynamicLayer for x in layers)


def cache_cat(a: Any, b: Any) -> Any | None:
    """A cache holding the rows of ``a`` then the rows of ``b``; the shorter one is padded with zero
    columns at its end, which the caller masks out (keys carry their rotary positions already, so
    a key's column does not matter, only whether the mask lets a query see it).

    Args:
        a, b: caches whose layers are all plain ``DynamicLayer`` (full attention).

    Returns:
        The new cache (``a`` and ``b`` are left as they were), or None when a layer of either is
        of another kind (sliding window, static, quantized: columns mean something there).
    """
    if not (cache_paddable(a) and cache_paddable(b)) or len(a.layers) != len(b.layers):
        return None
    width = max(cache_length(a), cache_length(b))

    def grow(t: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (B, H, width, D)
        return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[-2]))

    out = copy.copy(a)
    out.layers = []
    for la, lb in zip(a.layers, b.layers, strict=True):
        layer = copy.copy(la)
        layer.keys = torch.cat([grow(la.keys), grow(lb.keys)], dim=0)
        layer.values = torch.cat([grow(la.values), grow(lb.values)], dim=0)
        out.layers.append(layer)
    return out


def sliding_window(model: torch.nn.Module) -> int | None:
    """The smallest attention window of ``model`` when some layer attends through one, else None.

    Args:
        model: a ``transformers`` causal LM.

    Returns:
        The window in tokens, or None (every layer attends to the whole sequence).
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return window if any("sliding" in str(t) for t in types) else None
    return window if getattr(cfg, "use_sliding_window", True) else None

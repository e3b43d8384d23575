"""A key/value prefix held once for many rows, and the attention that reads it (``transformers``
only; no lm-eval).

The shared-prefix generator (:mod:`evomerge.evaluation.generate`) runs a few-shot prefix once; a
row then needs only its own tokens' keys and values. A :func:`prefix_cache` holds the prefix's
keys and values once, ``(1, H, P, D)`` per layer, and each row's own columns in a buffer of fixed
width, ``(B, H, C, D)``; the model's attention reads both through :func:`prefix_attention`, which
swaps the model's ``sdpa`` attention for one that scores the queries of all rows against the
prefix in one matrix product per key/value head (the prefix read once per step, not once per row)
and against each row's own columns under the usual causal and padding mask, then takes one softmax
over both::

    scores = [q @ prefix_k.T | q @ own_k.T (masked)] * scale      # (B, Hq, T, P + n)
    out    = softmax(scores) @ [prefix_v ; own_v]

so the result is attention over the row's whole sequence, up to float rounding.

The cache reports only the own columns (``get_seq_length``), so the model builds its mask over
them; positions come from ``position_ids`` (keys carry their rotary positions already).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from evomerge.compat import attention_implementation, attention_implementations
from evomerge.evaluation.kv import GrowingLayer, cache_paddable

__all__ = [
    "PREFIX_KWARG",
    "batch_rows",
    "cache_elements",
    "compact",
    "merge_rows",
    "prefix_attention",
    "prefix_attention_reason",
    "prefix_cache",
]

PREFIX_KWARG = "evomerge_prefix"  # the forward's keyword that hands the cache to the attention
_NAME = "evomerge_prefix_sdpa"  # the attention implementation registered with transformers
ROW_CAP = 4  # rows decoded together: at most this many times the user's batch size


def batch_rows(batch_size: int, prefix: int, columns: int, items: int) -> int:
    """Rows to decode together so that the key/value cache holds no more than ``HFLM`` holds at
    ``batch_size`` for the same items.

    ``HFLM`` keeps, per row, the whole prompt and the answer: at most ``prefix + columns``
    key/value columns (``columns``: the longest own suffix plus the largest ``max_gen_toks``), so
    ``batch_size * (prefix + columns)`` in all. The shared path keeps the prefix once and
    ``columns`` per row, so::

        rows = floor((batch_size * (prefix + columns) - prefix) / columns)

    (at least ``batch_size``), capped by the items left and by ``ROW_CAP * batch_size``: the
    logits and activations of a step grow with the rows and are not part of the cache, and past a
    few times the batch size a CPU step costs about what its rows cost, so more rows buy little.

    Args:
        batch_size: the user's batch size (rows ``HFLM`` decodes together).
        prefix: shared prefix tokens.
        columns: own columns one row may need: longest suffix plus largest token budget.
        items: rows left to decode.

    Returns:
        The number of rows, at least 1.

    Example:
        >>> batch_rows(16, 852, 92 + 256, 40)  # GSM8K-shaped: 52 rows fit, 40 items left
        40
    """
    fit = (batch_size * (prefix + columns) - prefix) // max(1, columns)
    return max(1, min(items, ROW_CAP * batch_size, max(batch_size, fit)))


class _PrefixLayer(GrowingLayer):
    """Keys and values of a prefix shared by every row, held once, and each row's first ``n``
    own columns in a buffer of fixed width (``keys``/``values``: the own columns only;
    :meth:`held` counts the own buffers, the prefix being shared)."""

    def __init__(
        self, prefix_k: torch.Tensor, prefix_v: torch.Tensor, own: tuple, n: int = 0
    ) -> None:
        DynamicLayer.__init__(self)  # the own buffers are taken as they are, not copied
        self.is_initialized = True
        self.device = prefix_k.device
        self.prefix_keys, self.prefix_values = prefix_k, prefix_v  # (1, H, P, D)
        self._k, self._v = own  # (B, H, capacity, D)
        self._view(n)

    def _full(self, n: int) -> None:  # the decoder compacts first: rows never need more
        raise RuntimeError(f"prefix cache full: {n} columns of {self._k.shape[-2]}")


def prefix_cache(prefix: Any, rows: int, capacity: int) -> Any:
    """An empty cache for ``rows`` rows over ``prefix``: its keys and values held once (not
    copied), and ``capacity`` own columns per row.

    Args:
        prefix: the prefix's cache (one row; full-attention layers, see
            :func:`prefix_attention_reason`).
        rows: rows of the new cache.
        capacity: own columns each row may hold.

    Returns:
        The new cache (``get_seq_length`` 0); ``prefix`` is left as it was.
    """
    out = copy.copy(prefix)
    out.layers = []
    for x in prefix.layers:
        k, v = x.keys[:1], x.values[:1]  # (1, H, P, D): views, the prefix is not copied
        own_k = k.new_zeros((rows, k.shape[1], capacity, k.shape[-1]))
        own_v = v.new_zeros((rows, v.shape[1], capacity, v.shape[-1]))
        out.layers.append(_PrefixLayer(k, v, (own_k, own_v)))
    return out


def merge_rows(a: Any, b: Any) -> int:
    """Append the rows of ``b`` to ``a`` (both from :func:`prefix_cache` over the same prefix and
    capacity), each row's columns right-aligned to the longer of the two: the columns a row does
    not use are on its left, where :func:`compact` can drop them. ``b`` is emptied.

    Args:
        a, b: the two caches.

    Returns:
        The number of own columns of the merged cache.
    """
    na, nb = a.get_seq_length(), b.get_seq_length()
    n = max(na, nb)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        k = la._k.new_zeros((la._k.shape[0] + lb._k.shape[0], *la._k.shape[1:]))  # (B, H, C, D)
        v = la._v.new_zeros((la._v.shape[0] + lb._v.shape[0], *la._v.shape[1:]))
        ra = la._k.shape[0]
        k[:ra, :, n - na : n], v[:ra, :, n - na : n] = la.keys, la.values
        k[ra:, :, n - nb : n], v[ra:, :, n - nb : n] = lb.keys, lb.values
        # One layer at a time, so that only one layer is ever held twice.
        a.layers[i] = type(la)(la.prefix_keys, la.prefix_values, (k, v), n)
        b.layers[i] = None
    b.layers = []
    return n


def compact(cache: Any, dead: int) -> None:
    """Drop the first ``dead`` own columns of every row (columns no row's mask lets it see).

    Args:
        cache: a cache from :func:`prefix_cache`.
        dead: columns to drop, at most its length.
    """
    for x in cache.layers:
        n = x._n
        x._k[:, :, : n - dead] = x._k[:, :, dead:n].clone()
        x._v[:, :, : n - dead] = x._v[:, :, dead:n].clone()
        x._view(n - dead)


def cache_elements(cache: Any) -> int:
    """Key/value elements ``cache`` holds: the buffers of layers that grow in place (their whole
    capacity), else the keys and values (0 for None).

    Args:
        cache: a ``transformers`` ``Cache`` (or None).

    Returns:
        The number of elements.
    """
    return sum(
        x.held() if isinstance(x, GrowingLayer) else int(x.keys.numel() + x.values.numel())
        for x in getattr(cache, "layers", None) or []
        if getattr(x, "keys", None) is not None
    )


def prefix_attention_reason(model: torch.nn.Module, prefix: Any) -> str:
    """Why ``model`` cannot decode over a prefix held once ("" when it can): it must attend
    through transformers' ``sdpa`` implementation, in eval mode, with no soft-capping of attention
    logits, and ``prefix`` (its cache of the prefix) must hold plain full-attention layers.

    Args:
        model: a ``transformers`` causal LM.
        prefix: the cache of its prefix pass.

    Returns:
        The reason, or "".
    """
    if model.training:
        return "the model is in training mode"
    impl = attention_implementations(model)
    if impl != {"sdpa"}:
        return f"attention implementation {', '.join(sorted(impl))} (not sdpa)"
    config = getattr(model, "config", None)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logits soft-capped (attn_logit_softcapping)"
    if not cache_paddable(prefix):
        return f"a {type(prefix).__name__} cache with other than full-attention layers"
    return ""


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, Hq, T, D)
    key: torch.Tensor,  # (B, Hkv, n, D): the rows' own columns
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # (B, 1, T, n) bool, True where a key is seen
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = kwargs.pop(PREFIX_KWARG, None)
    if cache is None:  # a forward without a shared prefix: transformers' own sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("prefix attention supports no dropout, softcap or attention sinks")
    layer = cache.layers[module.layer_idx]
    pk, pv = layer.prefix_keys[0], layer.prefix_values[0]  # (Hkv, P, D)
    b, hq, t, d = query.shape
    hkv, n, p = key.shape[1], key.shape[2], pk.shape[1]
    g = hq // hkv  # query heads per key/value head, consecutive (as repeat_kv orders them)
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D)
    # The prefix: every row's queries against the prefix in one product per key/value head.
    qp = q.transpose(0, 1).reshape(hkv, b * g * t, d)  # (Hkv, B*G*T, D)
    pre = torch.matmul(qp, pk.transpose(-1, -2)).view(hkv, b, g * t, p).transpose(0, 1)
    own = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, G*T, n)
    if attention_mask is None and t > 1:  # sdpa_mask skipped it: causal, no padding
        i = torch.arange(t, device=query.device)[:, None] + (n - t)
        attention_mask = (torch.arange(n, device=query.device)[None, :] <= i)[None, None]
    if attention_mask is not None:
        mask = attention_mask[:, :, None].expand(b, 1, g, t, n).reshape(b, 1, g * t, n)
        own = own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else own + mask
    # (B, Hkv, G*T, P + n); the prefix is visible to every query, so no row is fully masked.
    probs = (torch.cat([pre, own], dim=-1) * scale).float().softmax(-1).to(value.dtype)
    pp = probs[..., :p].transpose(0, 1).reshape(hkv, b * g * t, p)
    out = torch.matmul(pp, pv).view(hkv, b, g * t, d).transpose(0, 1)
    out = out + torch.matmul(probs[..., p:], value)  # (B, Hkv, G*T, D)
    return out.reshape(b, hq, t, d).transpose(1, 2).contiguous(), None  # (B, T, Hq, D)


@lru_cache(maxsize=1)
def _register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_NAME, _attention)
    AttentionMaskInterface.register(_NAME, sdpa_mask)  # masks as sdpa's: True where a key is seen
    return _NAME


@contextmanager
def prefix_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s attention reads a prefix cache handed to its forward as
    ``evomerge_prefix=cache`` (forwards without it run transformers' ``sdpa`` as before). The
    model's configs are restored on exit. Not thread-safe: the configs are the model's.

    Args:
        model: a model :func:`prefix_attention_reason` accepts.

    Raises:
        ValueError: a model it does not accept.
    """
    if attention_implementations(model) != {"sdpa"}:
        raise ValueError("prefix attention needs a model that attends through sdpa")
    with attention_implementation(model, _register()):
        yield

"""Loglikelihood scoring that runs each shared context once.

lm-eval scores every (context, continuation) pair of a multiple-choice item as its own sequence, so
a 4-choice item computes its context 4 times. :func:`score_shared` groups the pairs by their context
tokens, runs each context once (batched, right-padded) and keeps its keys and values; every
continuation of the group then runs on a copy of those rows of the cache::

    context pass    c0 c1 c2 .. c(n-2)            -> cache, one row per distinct context
    continuation    c(n-1) x0 x1 .. x(m-2)        -> logits for x0 .. x(m-1), one row per pair
                    (positions n-1 .., attending to the context row and its own earlier tokens)

The continuation rows are exactly HFLM's last ``len(continuation)`` input positions, so the sums of
log-softmax and the argmax test are HFLM's, up to float rounding (matmul shapes differ).

Truncation is HFLM's, exactly: a pair longer than ``max_length + 1`` tokens keeps its last
``max_length + 1`` tokens, so its context is left-truncated by an amount that depends on the
continuation's length. Pairs are grouped by that *truncated* context, so truncated pairs still
match HFLM (positions restart at 0 as in HFLM), they just share less.

:class:`~evomerge.evaluation.hflm.SharedContextHFLM` puts this under lm-eval's ``HFLM``. This
module is torch only (the model's cache and forward: :mod:`evomerge.evaluation.kv`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from evomerge.evaluation.kv import cache_rows, forward_names, output_cache

__all__ = ["score_shared"]


@dataclass
class _Group:
    """The pairs that share one (truncated) context. ``prefix`` is that context but its last token:
    it runs once and stays as keys/values; each row starts with the context's last token."""

    prefix: tuple[int, ...]
    # (request index, input, continuation)
    rows: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def _plan(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise ValueError(
                f"request {i}: context and continuation must both have tokens, got {len(ctx)} and {len(cont)}"
            )
        if len(cont) > max_length:
            raise ValueError(
                f"request {i}: the continuation ({len(cont)} tokens) must fit max_length ({max_length})"
            )
        # HFLM's window: the last max_length + 1 tokens of context + continuation, the last one dropped.
        keep = max_length + 1 - len(cont)
        ctx = ctx[-keep:]
        key = tuple(ctx[:-1])
        groups.setdefault(key, _Group(key)).rows.append((i, ctx[-1:] + cont[:-1], cont))
    # Longest contexts first (as HFLM: memory errors show at once), then the longest rows of a group.
    out = sorted(groups.values(), key=lambda g: (-len(g.prefix), g.prefix))
    for g in out:
        g.rows.sort(key=lambda r: -len(r[2]))
    return out


def score_shared(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device | str | None = None,
    softmax_dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[tuple[float, bool]]:
    """Log-likelihood of each continuation given its context, each distinct context run once.

    Args:
        model: a ``transformers`` causal LM that returns a ``Cache`` (Llama, Mistral, Qwen, GPT-2, ...).
        requests: ``(context tokens, continuation tokens)`` pairs, both non-empty.
        max_length: the longest input the model sees; longer pairs lose context tokens on the left,
            as in HFLM.
        batch_size: contexts per context pass and continuations per continuation pass.
        device: where inputs go (default: the model's first parameter's device).
        softmax_dtype: dtype of the log-softmax (None: the logits' dtype), as HFLM's argument.
        autocast_dtype: run the forwards under autocast to this dtype (None: no autocast), as
            HFLM's ``mixed_precision_dtype``.

    Returns:
        ``(sum of log-probabilities of the continuation tokens, whether each one is the argmax)``
        per request, in request order.

    Raises:
        ValueError: an empty context or continuation, a continuation longer than ``max_length``,
            ``batch_size`` < 1.

    Example:
        >>> score_shared(model, [([1, 5, 9], [4]), ([1, 5, 9], [7, 2])], max_length=2048, batch_size=8)  # doctest: +SKIP
        [(-3.97..., False), (-8.12..., False)]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    groups = _plan(requests, max_length)
    cache_name, keep_name = forward_names(model)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    autocast = torch.autocast(
        device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
    )
    with torch.no_grad(), autocast:
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            cache = _context_pass(model, chunk, device, keep_name)
            _continuation_passes(
                model, chunk, cache, cache_name, batch_size, device, softmax_dtype, out
            )
    return [r for r in out if r is not None]


def _context_pass(
    model: torch.nn.Module, chunk: list[_Group], device: torch.device, keep_name: str | None
) -> Any:
    """Keys/values of the chunk's contexts, right-padded (causal attention never lets a context token
    see the padding after it; the continuation pass masks it out)."""
    width = max(len(g.prefix) for g in chunk)
    if width == 0:
        return None
    # (G, P); pad id 0, never attended to
    ids = pad_sequence([torch.tensor(g.prefix, dtype=torch.long) for g in chunk], batch_first=True)
    keep = {keep_name: 1} if keep_name is not None else {}  # the context's logits are not needed
    return output_cache(model(input_ids=ids.to(device), use_cache=True, **keep))


def _continuation_passes(
    model,
    chunk: list[_Group],
    cache: Any,
    cache_name: str,
    batch_size: int,
    device: torch.device,
    softmax_dtype: torch.dtype | None,
    out: list[tuple[float, bool] | None],
) -> None:
    width = max(len(g.prefix) for g in chunk)
    rows = [(gi, row) for gi, g in enumerate(chunk) for row in g.rows]
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        n_rows, cols = len(part), max(len(r[2]) for _, r in part)
        inp = pad_sequence([torch.tensor(r[1]) for _, r in part], batch_first=True)  # (R, C)
        target = pad_sequence([torch.tensor(r[2]) for _, r in part], batch_first=True)  # (R, C)
        # (R, P + C): context row, then own tokens
        mask = torch.zeros((n_rows, width + cols), dtype=torch.long)
        pos = torch.arange(cols).repeat(n_rows, 1)  # (R, C)
        for j, (gi, (_, _, cont)) in enumerate(part):
            n, p = len(cont), len(chunk[gi].prefix)
            mask[j, :p] = 1
            mask[j, width : width + n] = 1
            pos[j] += p  # positions go on from the context's own length, not from the padded width
        kwargs: dict[str, Any] = {"position_ids": pos.to(device), "use_cache": False}
        if cache is not None:
            index = torch.tensor([gi for gi, _ in part], device=device)
            kwargs |= {
                cache_name: cache_rows(cache, index),
                "attention_mask": mask.to(device),
                "use_cache": True,
            }
        logits = model(input_ids=inp.to(device), **kwargs).logits  # (R, C, V)
        logp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        target = target.to(device)
        valid = mask[:, width:].to(device).bool()  # (R, C): a row's own tokens
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (R, C)
        sums = picked.masked_fill(~valid, 0.0).sum(-1)
        greedy = ((logp.argmax(-1) == target) | ~valid).all(-1)
        for j, (_, (i, _, _)) in enumerate(part):
            out[i] = (float(sums[j]), bool(greedy[j]))

"""Greedy generation that runs a shared prompt prefix once.

A few-shot generation task (GSM8K: five worked examples, about 800 tokens, then the question) gives
every item the same long prefix. :func:`generate_shared` runs the prefix of a group of requests once
and keeps its keys and values; each item then runs only its own tokens and is decoded greedily, a
batch of rows at a time::

    prefix pass    p0 p1 .. p(P-1)                   -> cache, held once
    item pass      [pad ..] s0 s1 .. s(n-1)          -> each row's first token (positions P.., pads masked)
    decode steps   g0 g1 ..                          -> one token per active row per step

The item tokens are right-aligned (padding before them, masked out), so every row's last input is
in the last column; positions are each row's own (``P + i``), as in HF's ``generate`` with left
padding. A row stops at its own stop strings, end-of-text ids or token budget and leaves the batch
(its cache rows are dropped); when a quarter of the places are free, the group's next rows run
their own tokens and join the batch, so the decoding costs what the rows need rather than what
each batch's longest row needs. Greedy decoding picks the first maximum of each row's logits, as
HF's greedy search does; the two agree up to float rounding (matmul shapes differ).

On models that attend through transformers' ``sdpa`` with full-attention caches (Llama, Mistral,
Qwen, ...), the prefix's keys and values are held once and each row holds only its own columns
(:mod:`~evomerge.evaluation.prefixkv`) wherever that lets more rows than the batch size fit in the
key/value memory ``HFLM`` uses at the batch size (:func:`~evomerge.evaluation.prefixkv.batch_rows`):
fewer decode steps run, and each step reads the prefix once for all rows. Elsewhere (other models,
a prefix short beside the rows' own tokens) the prefix is copied into each row and ``batch_size``
rows are decoded (the cache appends in place: :func:`~evomerge.evaluation.kv.growing`).

A stop string is looked for in the decoded text of the row's last few tokens, then confirmed in
the decoded text of all its tokens: a row stops at the first token after which its decoded text
holds a stop string, so the text before the first stop string is the text a longer generation has.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.compat import sdpa_grouped_heads
from evomerge.evaluation.kv import (
    cache_cat,
    cache_length,
    cache_paddable,
    cache_rows,
    forward_names,
    growing,
    output_cache,
)
from evomerge.evaluation.prefixkv import (
    PREFIX_KWARG,
    batch_rows,
    cache_elements,
    compact,
    merge_rows,
    prefix_attention,
    prefix_attention_reason,
    prefix_cache,
)

__all__ = ["GenRequest", "GenStats", "generate_shared", "common_prefix"]


@dataclass(frozen=True)
class GenRequest:
    """One greedy generation: the prompt's tokens (already truncated), the stop strings, the token
    budget, and the group it shares a prefix with (``None``: one group for all)."""

    tokens: Sequence[int]
    until: Sequence[str] = ()
    max_new: int = 256
    group: Hashable = None


@dataclass
class GenStats:
    """Tokens :func:`generate_shared` ran: prefix tokens (once per group), item tokens, generated
    tokens, and decode steps (forward passes after the item pass)."""

    prefix_tokens: int = 0
    item_tokens: int = 0
    generated: int = 0
    steps: int = 0
    rows: int = 0  # the most rows decoded together
    kv_peak: int = 0  # the most key/value elements held at once (the prefix counted once)
    groups: list[int] = field(default_factory=list)  # prefix length of each group


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs`` (0 for none).

    Example:
        >>> common_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2]])
        2
    """
    return len(os.path.commonprefix([list(s) for s in seqs]))  # element-wise on lists too


@dataclass
class _Row:
    index: int
    suffix: list[int]
    until: tuple[str, ...]
    max_new: int
    out: list[int] = field(default_factory=list)


def generate_shared(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[GenRequest],
    *,
    batch_size: int,
    eos_ids: Sequence[int] = (),
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    stats: GenStats | None = None,
) -> list[list[int]]:
    """Greedy continuations of ``requests``, each group's shared prefix run once (how rows are
    batched and refilled: the module's text; a batch whose cache layers are not plain
    full-attention ones is refilled once it is empty).

    Args:
        model: a ``transformers`` causal LM that returns a ``Cache`` (Llama, Mistral, Qwen, ...).
        tokenizer: decodes generated tokens to look for stop strings (``skip_special_tokens``).
        requests: the prompts, stop strings and budgets; requests of one ``group`` share the longest
            common prefix of their tokens (all but one token of the shortest, at most).
        batch_size: the batch size whose key/value memory bounds the rows decoded together (rows
            whose own tokens run together).
        eos_ids: token ids that end a row (the model's end-of-text ids, as ``generate`` uses them).
        device: where inputs go (default: the model's first parameter's device).
        autocast_dtype: run the forwards under autocast to this dtype (None: no autocast).
        stats: if given, the token counts are added to it.

    Returns:
        Per request, in request order, the generated token ids: up to and including the token that
        completed a stop string or was an end-of-text id, else ``max_new`` tokens.

    Raises:
        ValueError: a request without tokens, ``batch_size`` < 1.

    Example:
        >>> generate_shared(model, tok, [GenRequest(ids, ["\\n"], 32)], batch_size=8)  # doctest: +SKIP
        [[220, 1135, 198]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for i, r in enumerate(requests):
        if not r.tokens:
            raise ValueError(f"request {i}: the prompt must have at least one token")
        groups.setdefault(r.group, []).append(i)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    run = stats if stats is not None else GenStats()
    dec = _Decoder(model, tokenizer, frozenset(int(e) for e in eos_ids), device, run)
    out: list[list[int]] = [[] for _ in requests]
    autocast = torch.autocast(
        device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
    )
    with torch.no_grad(), autocast, sdpa_grouped_heads(device):
        for members in groups.values():
            seqs = [list(requests[i].tokens) for i in members]
            # Every row keeps at least one token of its own: its last logits start the generation.
            p = min(common_prefix(seqs), min(len(s) for s in seqs) - 1)
            rows = [
                _Row(i, s[p:], tuple(requests[i].until), int(requests[i].max_new))
                for i, s in zip(members, seqs, strict=True)
            ]
            run.prefix_tokens += p
            run.groups.append(p)
            todo = sorted((r for r in rows if r.max_new > 0), key=lambda r: -len(r.suffix))
            if todo:  # longest first: memory errors show at once
                ids = torch.tensor([seqs[0][:p]], device=device)
                dec.run_group(dec.forward(input_ids=ids)[1] if p else None, p, todo, batch_size)
            for row in rows:
                out[row.index] = row.out
    return out


@dataclass
class _Batch:
    """Rows being decoded: their cache, the mask over its columns, each row's next position and
    the last token each row generated (not fed yet)."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor  # (B, L): 1 where a cache column is the row's (prefix, own tokens)
    nxt: torch.Tensor  # (B,)
    last: torch.Tensor  # (B,)


@dataclass
class _Group:
    """How a group's rows are decoded: over a prefix held once (``capacity`` own columns a row),
    or over a copy of it per row (``capacity`` 0); ``base``: key/value elements held besides the
    rows' (the prefix)."""

    prefix: Any
    p: int
    rows: int
    chunk: int
    capacity: int = 0
    base: int = 0


@dataclass
class _Decoder:
    model: torch.nn.Module
    tokenizer: Any
    eos: frozenset[int]
    device: torch.device
    run: GenStats

    def __post_init__(self) -> None:
        self.cache_name, self.keep = forward_names(self.model)

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if self.keep is not None:
            kwargs[self.keep] = 1  # only the last position's logits are used
        res = self.model(use_cache=True, **kwargs)
        return res.logits[:, -1], output_cache(res)

    def _held(self, g: _Group, *caches: Any) -> None:
        held = g.base + sum(cache_elements(c) for c in caches if c is not None)
        self.run.kv_peak = max(self.run.kv_peak, held)

    def run_group(self, prefix: Any, p: int, todo: list[_Row], batch_size: int) -> None:
        capacity = max(len(r.suffix) for r in todo) + max(r.max_new for r in todo)
        rows = batch_rows(batch_size, p, capacity, len(todo))
        # Held once only where more rows fit: a prefix short beside the rows' own tokens saves no
        # memory, and sdpa's fused kernel beats explicit attention over long own columns.
        if rows > batch_size and not prefix_attention_reason(self.model, prefix):
            g = _Group(prefix, p, rows, batch_size, capacity, cache_elements(prefix))
            with prefix_attention(self.model):
                self._decode(g, todo, refill=True)
            return
        prefix = growing(prefix) if prefix is not None else None
        self._decode(_Group(prefix, p, batch_size, batch_size, 0, cache_elements(prefix)), todo)

    def _decode(self, g: _Group, todo: list[_Row], refill: bool = False) -> None:
        pending = list(reversed(todo))  # pop() takes the longest first
        batch: _Batch | None = None
        self.run.rows = max(self.run.rows, min(g.rows, len(todo)))
        while pending or batch is not None:
            n = len(batch.rows) if batch is not None else 0
            free = g.rows - n
            if pending and (n == 0 or (refill and free >= max(1, g.rows // 4))):
                take = [pending.pop() for _ in range(min(free, len(pending)))]
                for i in range(0, len(take), g.chunk):  # own tokens run batch_size rows at a time
                    new = self.admit(g, take[i : i + g.chunk], batch)
                    if batch is None:
                        batch = new
                        refill = refill or (batch is not None and cache_paddable(batch.cache))
                    elif new is not None:
                        batch = _merge(batch, new, g.capacity > 0)
                    self._held(g, batch.cache if batch is not None else None)
            elif batch is not None:
                batch = self.advance(g, batch)

    def admit(self, g: _Group, rows: list[_Row], batch: _Batch | None) -> _Batch | None:
        """Run the rows' own tokens after the prefix; returns those not finished by their first
        token."""
        n, width, p = len(rows), max(len(r.suffix) for r in rows), g.p
        own = p if g.capacity == 0 else 0  # prefix columns in each row's cache and mask
        ids = torch.zeros((n, width), dtype=torch.long)  # (B, W), own tokens right-aligned
        pos = torch.full((n, width), p, dtype=torch.long)  # (B, W)
        mask = torch.zeros((n, own + width), dtype=torch.long)  # (B, [P] + W): prefix, pads, own
        mask[:, :own] = 1
        for j, r in enumerate(rows):
            k = len(r.suffix)
            ids[j, width - k :] = torch.tensor(r.suffix)
            pos[j, width - k :] = torch.arange(p, p + k)
            mask[j, own + width - k :] = 1
            self.run.item_tokens += k
        kwargs: dict[str, Any] = {}
        if g.capacity:
            kwargs[self.cache_name] = kwargs[PREFIX_KWARG] = prefix_cache(g.prefix, n, g.capacity)
        elif g.prefix is not None:
            index = torch.zeros(n, dtype=torch.long, device=self.device)
            kwargs[self.cache_name] = cache_rows(g.prefix, index)
        mask = mask.to(self.device)
        logits, cache = self.forward(
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=pos.to(self.device),
            **kwargs,
        )
        self._held(g, cache, batch.cache if batch is not None else None)
        nxt = pos[:, -1].to(self.device) + 1
        return self._pick(rows, logits, cache if g.capacity else growing(cache), mask, nxt)

    def advance(self, g: _Group, b: _Batch) -> _Batch | None:
        """Feed each row's last token; returns the rows not finished."""
        kwargs = {self.cache_name: b.cache}
        if g.capacity:
            kwargs[PREFIX_KWARG] = b.cache
            if b.mask.shape[1] == g.capacity:  # full: drop the columns no row sees any more
                dead = int(b.mask.any(0).long().argmax())
                compact(b.cache, dead)
                b.mask = b.mask[:, dead:]
        mask = torch.cat([b.mask, b.mask.new_ones((len(b.rows), 1))], dim=1)
        logits, cache = self.forward(
            input_ids=b.last[:, None],
            attention_mask=mask,
            position_ids=b.nxt[:, None],
            **kwargs,
        )
        self.run.steps += 1
        self._held(g, cache)
        return self._pick(b.rows, logits, cache, mask, b.nxt + 1)

    def _pick(
        self,
        rows: list[_Row],
        logits: torch.Tensor,
        cache: Any,
        mask: torch.Tensor,
        nxt: torch.Tensor,
    ) -> _Batch | None:
        token = logits.argmax(-1)  # (B,) greedy: the first maximum, as generate's
        self.run.generated += len(rows)
        keep = [
            k
            for k, t in enumerate(token.tolist())
            if not _step(self.tokenizer, rows[k], t, self.eos)
        ]
        if not keep:
            return None
        if len(keep) < len(rows):  # finished rows leave the batch
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            token, mask, nxt = token[index], mask[index], nxt[index]
        return _Batch([rows[k] for k in keep], cache, mask, nxt, token)


def _merge(a: _Batch, b: _Batch, held_once: bool) -> _Batch:
    if held_once:  # own columns right-aligned: each mask padded on its left
        width = merge_rows(a.cache, b.cache)
        cache, left = a.cache, True
    else:  # whole rows, the shorter padded on its right
        cache, left = cache_cat(a.cache, b.cache), False  # _decode refills only paddable ones
        width = cache_length(cache)

    def grow(m: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, width), new columns masked
        pad = width - m.shape[1]
        return torch.nn.functional.pad(m, (pad, 0) if left else (0, pad))

    return _Batch(
        a.rows + b.rows,
        cache,
        torch.cat([grow(a.mask), grow(b.mask)]),
        torch.cat([a.nxt, b.nxt]),
        torch.cat([a.last, b.last]),
    )


def _step(tokenizer: Any, row: _Row, token: int, eos: frozenset[int]) -> bool:
    """Append ``token`` to ``row``; True when the row is finished."""
    row.out.append(token)
    if token in eos or len(row.out) >= row.max_new:
        return True
    stops = [s for s in row.until if s]
    if not stops:
        return False
    # A stop string of c characters ends in the last token and spans at most c tokens when every
    # token decodes to one character or more; two more cover tokens that decode to none.
    tail = tokenizer.decode(row.out[-(max(map(len, stops)) + 2) :], skip_special_tokens=True)
    if not any(s in tail for s in stops):
        return False
    text = tokenizer.decode(row.out, skip_special_tokens=True)
    return any(s in text for s in stops)

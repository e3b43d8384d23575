"""Compiled (``torch.compile``) task-vector kernels for re-merging resident tensors on CPU.

The chunked kernels of :mod:`evomerge.engine.kernels.chunked` run ~40 torch ops per 64K-entry chunk: on a CPU
that is bound by op dispatch, not by memory (see the benchmark pages for the figures).
Here the same arithmetic is written once as whole-tensor torch ops and compiled by inductor into one
loop per tensor: every input is read once, nothing is materialised but the output, and the loop
runs on every core.

Compiling costs seconds per kernel variant (method family, number of inputs, dtypes), so it is used
only where merges repeat: by a resident :class:`~evomerge.engine.merger.Merger` (the search), on CPU
or CUDA (inductor's C++ or Triton code), for tensors of at least :data:`MIN_NUMEL` entries. Stream 2
random masks are computed inside the loop from the entry index (:func:`~evomerge.engine.rng.hash_uniform`),
so a DARE re-merge reads no field. Should compiling fail (no C++ compiler, an
unsupported platform), one warning is printed and the chunked kernels are used from then on.

The op sequence mirrors :func:`~evomerge.engine.kernels.chunked.fused_task_vectors` op for op (the same
rounding at every step; inductor does not contract or reassociate floating-point math by
default), so both paths produce the same tensors: an exported recipe re-merges on disk to the
tensors the search scored. ``tests/engine/test_compiled.py`` checks that bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from evomerge.engine.kernels.common import base_of, combine_scalars, out_tensor
from evomerge.engine.kernels.rules import KeepAbove, KeepAll, KeepRandom, KeepRule
from evomerge.engine.rng import hash_uniform

if TYPE_CHECKING:
    from evomerge.engine.inputs import TensorInputs

__all__ = ["MIN_NUMEL", "available", "compiled_task_vectors", "reset"]

# Tensors below this size use the chunked kernels: one compiled call costs tens of microseconds of
# guards and launch, and small tensors are a negligible share of a model anyway.
MIN_NUMEL = int(os.environ.get("EVOMERGE_COMPILE_MIN", 1 << 20))
_FAILED: str | None = None
_COMPILED: dict[str, Any] = {}


def available() -> bool:
    """Whether compiled kernels may be used (not disabled by ``EVOMERGE_COMPILE=0``, never failed)."""
    return _FAILED is None and os.environ.get("EVOMERGE_COMPILE", "1") != "0"


def reset() -> None:
    """Forget a compile failure and the compiled functions (tests)."""
    global _FAILED
    _FAILED = None
    _COMPILED.clear()


def _mode(inp: TensorInputs, rules: list[KeepRule]) -> str | None:
    """How the compiled loop applies ``rules``: ``magnitude`` (thresholds), ``field`` (drawn
    U[0, 1) fields) or ``hash`` (stream 2's keys); None when it cannot (compiling disabled, a
    small tensor, masks, or drawn fields mixed with keys)."""
    if not (inp.compiled and available()) or inp.base is None:
        return None
    base = inp.raw(inp.base)
    if base.device.type not in ("cpu", "cuda") or base.numel() < MIN_NUMEL:
        return None
    if all(isinstance(r, (KeepAll, KeepAbove)) for r in rules):
        return "magnitude"
    if not all(isinstance(r, (KeepAll, KeepRandom)) for r in rules):
        return None
    drawn = {r.field is not None for r in rules if isinstance(r, KeepRandom)}
    return None if len(drawn) > 1 else "field" if True in drawn else "hash"


class _Rules(NamedTuple):
    """Every input's keep rule as the compiled loop reads it, one entry per input: ``thr`` the
    threshold of :class:`~evomerge.engine.kernels.rules.KeepAbove` (-1 keeps all) and ``cut`` the
    last of its ``extra`` positions (-1: none); ``p`` the probability of ``KeepRandom`` (inf keeps
    all) with its ``fields`` (``field`` mode) or its ``keys`` (``hash`` mode)."""

    fields: list[torch.Tensor]
    keys: torch.Tensor
    thr: torch.Tensor
    cut: torch.Tensor
    p: torch.Tensor


def _sparsify(
    d: torch.Tensor, j: int, mode: str, r: _Rules, idx: torch.Tensor | None
) -> torch.Tensor:
    """Input j's delta with the dropped entries set to 0, as the chunked kernels compute it.

    ``mode``: ``magnitude`` (TIES thresholds), ``field`` (stream 1 fields) or ``hash`` (stream 2,
    the field computed in the loop from the keys and the entry index: integer ops, exact).
    """
    if mode == "magnitude":
        t = r.thr[j]
        kd = torch.where((d >= -t) & (d <= t), 0.0, d)  # hardshrink(d, t)
        assert idx is not None
        return torch.where((d.abs() == t) & (idx <= r.cut[j]), d, kd)  # ties kept in index order
    if mode == "hash":
        assert idx is not None
        u = hash_uniform(idx, r.keys[j, 0], r.keys[j, 1])
    else:
        u = r.fields[j]
    m = (u - r.p[j]).clamp(max=0).sign()  # -1 where kept, else 0
    return -(d * m)


def _l1_sums(base: torch.Tensor, xs: list[torch.Tensor], r: _Rules, mode: str) -> torch.Tensor:
    """Per input: ``[sum |delta|, sum |kept delta|]`` in float64."""
    b = base.to(r.thr.dtype)
    idx = torch.arange(b.shape[0], device=b.device) if mode != "field" else None
    sums = []
    for j, x in enumerate(xs):
        d = x.to(r.thr.dtype) - b
        kd = _sparsify(d, j, mode, r, idx)
        sums.append(
            torch.stack([d.abs().sum(dtype=torch.float64), kd.abs().sum(dtype=torch.float64)])
        )
    return torch.stack(sums)


def _combine(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    r: _Rules,
    mode: str,
    scalars: tuple[torch.Tensor, ...],
    out: torch.Tensor,
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    """``base + lam * combine(kept deltas)`` written into ``out``; returns whether it is all finite.

    ``scalars``: the per-input coefficients and weights, lambda and the flat divisor
    (:func:`~evomerge.engine.kernels.common.combine_scalars`).
    """
    coef, w, lam, flat_div = scalars
    b = base.to(r.thr.dtype)
    idx = torch.arange(b.shape[0], device=b.device) if mode != "field" else None
    wds = [_sparsify(x.to(r.thr.dtype) - b, j, mode, r, idx) * coef[j] for j, x in enumerate(xs)]
    if consensus:
        total = wds[0]
        for wd in wds[1:]:
            total = total + wd
        sign = torch.copysign(torch.ones_like(total), total)
        acc = div = None
        for j, wd in enumerate(wds):
            t = (wd * sign).clamp(min=0)
            if normalize:
                took = torch.sign(t)
                div = took * w[j] if div is None else div + took * w[j]
            acc = t if acc is None else acc + t
        assert acc is not None
        acc = acc * sign
        if div is not None:
            acc = acc / (div - (torch.sign(div).abs() - 1.0))  # a divisor of 0 becomes 1
    else:
        acc = wds[0]
        for wd in wds[1:]:
            acc = acc + wd
        acc = acc / flat_div  # 1 unless normalizing: exact
    acc = acc * lam + b  # lam is 1 unless set: exact
    o = acc.to(out.dtype)
    out.copy_(o)
    return torch.isfinite(o).all()


def _compiled(name: str) -> Any:
    fn = _COMPILED.get(name)
    if fn is None:
        # Each variant (method family, input count, dtypes) is one more compile of the same function;
        # a search over several methods can exceed dynamo's default of 8 per function.
        import torch._dynamo
        import torch._inductor.config

        for key in ("recompile_limit", "cache_size_limit"):
            if getattr(torch._dynamo.config, key, 64) < 64:
                setattr(torch._dynamo.config, key, 64)
        # On CUDA, Triton contracts a * b + c into one FMA unless told not to: that rounds once
        # where the eager and CPU kernels round twice, and the tensors would differ by device.
        torch._inductor.config.emulate_precision_casts = True
        kernels: dict[str, Callable[..., Any]] = {"combine": _combine, "l1": _l1_sums}
        fn = torch.compile(kernels[name], dynamic=True, fullgraph=True)
        _COMPILED[name] = fn
    return fn


def _call(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run a compiled kernel; on a compile failure warn once, disable compiling, return None."""
    global _FAILED
    try:
        return _compiled(name)(*args, **kwargs)
    except Exception as e:  # inductor raises many types (no compiler, codegen, ...)
        _FAILED = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(
            f"evomerge: torch.compile is unavailable ({_FAILED[:200]}); re-merges use the chunked kernels",
            file=sys.stderr,
        )
        return None


def compiled_task_vectors(
    inp: TensorInputs,
    rules: list[KeepRule],
    others: list[int],
    consensus: bool,
    rescale: bool,
) -> torch.Tensor | None:
    """The task-vector combine of :func:`~evomerge.engine.kernels.chunked.fused_task_vectors`, compiled.

    Returns the output tensor (``inp.out`` when it fits) and sets ``inp.finite``, or returns None
    when these inputs and rules are not for the compiled loop, or compiling failed (the caller then
    runs the chunked kernel).
    """
    mode = _mode(inp, rules)
    if mode is None:
        return None
    b = base_of(inp)
    dtype = inp.compute_dtype
    base = inp.raw(b).reshape(-1)
    xs = [inp.raw(i).reshape(-1) for i in others]
    thr, cut, p, fields, keys = [], [], [], [], []
    for i, r in zip(others, rules, strict=True):
        extra = r.extra if isinstance(r, KeepAbove) else None
        thr.append(r.threshold if isinstance(r, KeepAbove) else -1.0)
        cut.append(int(extra[-1]) if extra is not None and extra.numel() else -1)
        p.append(r.p if isinstance(r, KeepRandom) else math.inf)
        keys.append(r.keys if isinstance(r, KeepRandom) else (0, 0))
        if mode == "field":  # an input kept whole still needs a field: p = inf keeps all of it
            drawn = r.field if isinstance(r, KeepRandom) else None
            fields.append((drawn if drawn is not None else inp.uniform(i)).reshape(-1))
    device = base.device
    encoded = _Rules(
        fields,
        torch.tensor(keys, dtype=torch.int64, device=device),
        torch.tensor(thr, dtype=dtype, device=device),
        torch.tensor(cut, dtype=torch.int64, device=device),
        torch.tensor(p, dtype=dtype, device=device),
    )
    l1 = None
    if rescale:
        sums = _call("l1", base, xs, encoded, mode)
        if sums is None:
            return None
        l1 = [(before, after) for before, after in sums.tolist()]
    weights, coef, flat_div = combine_scalars(inp, others, l1)
    values = (coef, weights, float(inp.shared["lambda"]), flat_div)
    scalars = tuple(torch.tensor(v, dtype=dtype, device=device) for v in values)
    out = out_tensor(inp, inp.raw(b).shape)
    normalize = bool(inp.shared["normalize"])
    ok = _call("combine", base, xs, encoded, mode, scalars, out.view(-1), consensus, normalize)
    if ok is None:
        return None
    inp.finite = bool(ok)
    return out

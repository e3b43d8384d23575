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
tensors the search scored. ``tests/test_compiled.py`` checks that bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from evomerge.engine.kernels.common import combine_scalars, out_tensor
from evomerge.engine.rng import hash_uniform

if TYPE_CHECKING:
    from evomerge.engine.inputs import TensorInputs

__all__ = ["MIN_NUMEL", "available", "usable", "compiled_task_vectors", "reset"]

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


def usable(inp: TensorInputs, rules: list[tuple[Any, ...]]) -> bool:
    """Whether :func:`compiled_task_vectors` can merge these inputs with these keep rules."""
    if not (inp.compiled and available()):
        return False
    base = inp.raw(inp.base) if inp.base is not None else None
    if base is None or base.device.type not in ("cpu", "cuda") or base.numel() < MIN_NUMEL:
        return False
    kinds = {r[0] for r in rules}
    return (
        kinds <= {"all", "gt", "gt_extra"}
        or kinds <= {"all", "lt_uniform"}
        or kinds <= {"all", "lt_hash"}
    )


def _sparsify(
    d: torch.Tensor,
    j: int,
    mode: str,
    fields: list[torch.Tensor],
    keys: torch.Tensor,
    thr: torch.Tensor,
    cut: torch.Tensor,
    p: torch.Tensor,
    idx: torch.Tensor | None,
) -> torch.Tensor:
    """Input j's delta with the dropped entries set to 0, as :func:`fused._kept_delta` computes it.

    ``mode``: ``magnitude`` (TIES thresholds), ``field`` (stream 1 fields) or ``hash`` (stream 2,
    the field computed in the loop from the keys and the entry index: integer ops, exact).
    """
    if mode == "magnitude":
        t = thr[j]
        kd = torch.where((d >= -t) & (d <= t), 0.0, d)  # hardshrink(d, t)
        assert idx is not None
        return torch.where((d.abs() == t) & (idx <= cut[j]), d, kd)  # ties kept in index order
    if mode == "hash":
        assert idx is not None
        u = hash_uniform(idx, keys[j, 0], keys[j, 1])
    else:
        u = fields[j]
    m = (u - p[j]).clamp(max=0).sign()  # -1 where kept, else 0
    return -(d * m)


def _l1_sums(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    fields: list[torch.Tensor],
    keys: torch.Tensor,
    thr: torch.Tensor,
    cut: torch.Tensor,
    p: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """Per input: ``[sum |delta|, sum |kept delta|]`` in float64."""
    b = base.to(thr.dtype)
    idx = torch.arange(b.shape[0], device=b.device) if mode != "field" else None
    sums = []
    for j, x in enumerate(xs):
        d = x.to(thr.dtype) - b
        kd = _sparsify(d, j, mode, fields, keys, thr, cut, p, idx)
        sums.append(
            torch.stack([d.abs().sum(dtype=torch.float64), kd.abs().sum(dtype=torch.float64)])
        )
    return torch.stack(sums)


def _combine(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    fields: list[torch.Tensor],
    keys: torch.Tensor,
    thr: torch.Tensor,
    cut: torch.Tensor,
    p: torch.Tensor,
    coef: torch.Tensor,
    w: torch.Tensor,
    lam: torch.Tensor,
    flat_div: torch.Tensor,
    out: torch.Tensor,
    mode: str,
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    """``base + lam * combine(kept deltas)`` written into ``out``; returns whether it is all finite."""
    b = base.to(thr.dtype)
    idx = torch.arange(b.shape[0], device=b.device) if mode != "field" else None
    wds = [
        _sparsify(x.to(thr.dtype) - b, j, mode, fields, keys, thr, cut, p, idx) * coef[j]
        for j, x in enumerate(xs)
    ]
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
    rules: list[tuple[Any, ...]],
    others: list[int],
    consensus: bool,
    rescale: bool,
) -> torch.Tensor | None:
    """The task-vector combine of :func:`~evomerge.engine.kernels.chunked.fused_task_vectors`, compiled.

    Returns the output tensor (``inp.out`` when it fits) and sets ``inp.finite``, or returns None when
    compiling failed (the caller then runs the chunked kernel).
    """
    b = inp.base
    assert b is not None
    dtype = inp.compute_dtype
    base = inp.raw(b).reshape(-1)
    xs = [inp.raw(i).reshape(-1) for i in others]
    kinds = {r[0] for r in rules}
    mode = "hash" if "lt_hash" in kinds else "field" if "lt_uniform" in kinds else "magnitude"
    thr, cut, p, fields, keys = [], [], [], [], []
    for i, r in zip(others, rules, strict=False):
        kind = r[0]
        # An input kept whole (density 1) still gets its own field or keys, with p = inf.
        if mode == "field":
            fields.append(r[1].reshape(-1) if kind == "lt_uniform" else inp.uniform(i).reshape(-1))
        keys.append((r[1], r[2]) if kind == "lt_hash" else (0, 0))
        thr.append(-1.0 if kind == "all" else float(r[1]) if kind in ("gt", "gt_extra") else 0.0)
        cut.append(int(r[2][-1]) if kind == "gt_extra" and r[2].numel() else -1)
        p.append(
            float(r[-1]) if kind in ("lt_uniform", "lt_hash") else math.inf
        )  # inf: u - inf < 0 keeps all
    device = base.device
    thr_t = torch.tensor(thr, dtype=dtype, device=device)
    cut_t = torch.tensor(cut, dtype=torch.int64, device=device)
    p_t = torch.tensor(p, dtype=dtype, device=device)
    keys_t = torch.tensor(keys, dtype=torch.int64, device=device)
    l1 = None
    if rescale:
        sums = _call("l1", base, xs, fields, keys_t, thr_t, cut_t, p_t, mode)
        if sums is None:
            return None
        l1 = [(before, after) for before, after in sums.tolist()]
    weights, coef, flat_div = combine_scalars(inp, others, l1)
    normalize = bool(inp.shared["normalize"])
    out = out_tensor(inp, inp.raw(b).shape)
    ok = _call(
        "combine",
        base,
        xs,
        fields,
        keys_t,
        thr_t,
        cut_t,
        p_t,
        torch.tensor(coef, dtype=dtype, device=device),
        torch.tensor(weights, dtype=dtype, device=device),
        torch.tensor(float(inp.shared["lambda"]), dtype=dtype, device=device),
        torch.tensor(flat_div, dtype=dtype, device=device),
        out.view(-1),
        mode,
        consensus,
        normalize,
    )
    if ok is None:
        return None
    inp.finite = bool(ok)
    return out

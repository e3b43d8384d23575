"""Chunked, fused kernels for the methods that dominate merge time (task vectors, linear, slerp).

A kernel written as whole-tensor torch ops makes a dozen passes over each input, each allocating a
fresh tensor as large as the input: on a CPU that is memory bandwidth plus page faults, several
times the cost of reading the inputs once. Here a tensor is processed in chunks small enough to
stay in cache (``CHUNK`` elements): each input is read from memory once per pass, converted from
its stored dtype (bf16/f16) chunk by chunk, and the output is written once, in the output dtype,
straight into its destination (a resident model's parameter when there is one).

The arithmetic is the same as mergekit's whole-tensor formulation (see :mod:`evomerge.engine.methods`),
only reordered by chunks. Whole-tensor quantities (TIES thresholds, L1 norms for rescaling, slerp's
angle) are computed in a first pass, or taken from the :class:`~evomerge.engine.inputs.PrepCache`.

On CPU the chunks are shared among ``torch.get_num_threads()`` Python threads, each running
single-threaded torch ops (torch releases the GIL inside ops): small ops with intra-op threading
are slow, and badly so when other processes share the cores.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from evomerge.engine.inputs import TensorInputs

__all__ = ["CHUNK", "run_chunks", "abs_delta", "fused_task_vectors", "fused_linear", "fused_slerp"]

CHUNK = int(os.environ.get("EVOMERGE_CHUNK", 1 << 15))
_GPU_CHUNK = 1 << 22
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE != n:
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="evomerge-chunk")
            _POOL_SIZE = n
        return _POOL


class _Scratch:
    """Per-worker reusable buffers (one set per thread, so no allocation per chunk)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = self.bufs.get((key, dtype))
        if b is None or b.numel() < n:
            b = torch.empty(max(n, CHUNK if self.device.type == "cpu" else 0), dtype=dtype, device=self.device)
            self.bufs[(key, dtype)] = b
        return b[:n]


_LOCAL = threading.local()


def _scratch(device: torch.device) -> _Scratch:
    s: _Scratch | None = getattr(_LOCAL, "scratch", None)
    if s is None or s.device != device:
        s = _Scratch(device)
        _LOCAL.scratch = s
    return s


def run_chunks(n: int, device: torch.device, fn: Callable[[int, int, _Scratch], Any]) -> list[Any]:
    """Call ``fn(lo, hi, scratch)`` over ``[0, n)`` in chunks; return the results in chunk order.

    On CUDA the whole range is one chunk (GPU kernels do not need the cache blocking).
    """
    if device.type != "cpu":
        # GPU kernels need no cache blocking; chunks only bound the scratch memory.
        return [fn(lo, min(n, lo + _GPU_CHUNK), _scratch(device)) for lo in range(0, n, _GPU_CHUNK)]
    if n <= CHUNK:
        return [fn(0, n, _scratch(device))]
    bounds = [(lo, min(n, lo + CHUNK)) for lo in range(0, n, CHUNK)]
    workers = max(1, min(torch.get_num_threads(), len(bounds)))
    if workers == 1:
        return [fn(lo, hi, _scratch(device)) for lo, hi in bounds]
    per = math.ceil(len(bounds) / workers)
    groups = [bounds[i : i + per] for i in range(0, len(bounds), per)]

    def work(group: list[tuple[int, int]]) -> list[Any]:
        s = _scratch(device)
        return [fn(lo, hi, s) for lo, hi in group]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = list(_pool(workers).map(work, groups))
    finally:
        torch.set_num_threads(threads)
    return [r for part in parts for r in part]


def _f32(x: torch.Tensor, lo: int, hi: int, s: _Scratch, key: str, dtype: torch.dtype) -> torch.Tensor:
    """Chunk ``[lo, hi)`` of a flat input in the compute dtype (a view when already in it)."""
    c = x[lo:hi]
    if c.dtype == dtype:
        return c
    buf = s.get(key, hi - lo, dtype)
    buf.copy_(c)
    return buf


def _out(inp: TensorInputs, shape: torch.Size) -> torch.Tensor:
    out = inp.out
    if out is not None and out.shape == shape and out.is_contiguous():
        return out
    return torch.empty(shape, dtype=inp.out_dtype, device=inp.raw(0).device)


def fused_linear(inp: TensorInputs) -> torch.Tensor:
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``), chunk by chunk."""
    weights = [float(p["weight"]) for p in inp.per_input]
    scale = 1.0 / sum(weights) if inp.shared["normalize"] else 1.0
    xs = [inp.raw(i).reshape(-1) for i in range(len(inp))]
    out = _out(inp, inp.raw(0).shape)
    flat_out = out.view(-1)
    dtype = inp.compute_dtype

    def fn(lo: int, hi: int, s: _Scratch) -> None:
        acc = s.get("acc", hi - lo, dtype)
        for i, (x, w) in enumerate(zip(xs, weights)):
            c = _f32(x, lo, hi, s, "x", dtype)
            if i == 0:
                torch.mul(c, w * scale, out=acc)
            else:
                acc.add_(c, alpha=w * scale)
        flat_out[lo:hi].copy_(acc)

    run_chunks(xs[0].numel(), xs[0].device, fn)
    return out


def fused_slerp(inp: TensorInputs, t: float, v0i: int, v1i: int, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Slerp of two whole tensors (one flattened vector each): a reduction pass, then a blend pass."""
    v0, v1 = inp.raw(v0i).reshape(-1), inp.raw(v1i).reshape(-1)
    dtype = inp.compute_dtype

    def reduce(lo: int, hi: int, s: _Scratch) -> tuple[float, float, float]:
        a = _f32(v0, lo, hi, s, "a", dtype)
        b = _f32(v1, lo, hi, s, "b", dtype)
        return float(torch.dot(a, b)), float(torch.dot(a, a)), float(torch.dot(b, b))

    parts = run_chunks(v0.numel(), v0.device, reduce)
    dot = math.fsum(p[0] for p in parts)
    n0 = math.sqrt(math.fsum(p[1] for p in parts))
    n1 = math.sqrt(math.fsum(p[2] for p in parts))
    n0 = n0 if n0 > eps else 1.0
    n1 = n1 if n1 > eps else 1.0
    cos = min(1.0, max(-1.0, dot / (n0 * n1)))
    if abs(cos) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        c0 = math.sin((1 - t) * theta) / math.sin(theta)
        c1 = math.sin(t * theta) / math.sin(theta)
    out = _out(inp, inp.raw(v0i).shape)
    flat_out = out.view(-1)

    def blend(lo: int, hi: int, s: _Scratch) -> None:
        acc = s.get("acc", hi - lo, dtype)
        torch.mul(_f32(v0, lo, hi, s, "a", dtype), c0, out=acc)
        acc.add_(_f32(v1, lo, hi, s, "b", dtype), alpha=c1)
        flat_out[lo:hi].copy_(acc)

    run_chunks(v0.numel(), v0.device, blend)
    return out


# A keep rule for one input: ("all",), ("ge", threshold), ("lt_uniform", field, density) or
# ("mask", bool tensor); plus a rescale factor applied with the weight.
Rule = tuple[Any, ...]


def _delta_chunk(inp: TensorInputs, i: int, lo: int, hi: int, s: _Scratch, base_c: torch.Tensor, key: str) -> torch.Tensor:
    d = s.get(key, hi - lo, inp.compute_dtype)
    torch.sub(_f32(inp.raw(i).reshape(-1), lo, hi, s, key + "x", inp.compute_dtype), base_c, out=d)
    return d


def _kept(rule: Rule, d: torch.Tensor, lo: int, hi: int, s: _Scratch, key: str) -> torch.Tensor | None:
    """Boolean keep mask of a delta chunk, or None when everything is kept."""
    kind = rule[0]
    if kind == "all":
        return None
    m = s.get(key, hi - lo, torch.bool)
    if kind == "ge":
        a = s.get(key + "abs", hi - lo, d.dtype)
        torch.abs(d, out=a)
        torch.ge(a, rule[1], out=m)
    elif kind == "lt_uniform":
        torch.lt(rule[1].view(-1)[lo:hi], rule[2], out=m)
    else:
        m.copy_(rule[1].view(-1)[lo:hi])
    return m


def fused_task_vectors(inp: TensorInputs, rules: list[Rule], others: list[int], consensus: bool, rescale: bool) -> torch.Tensor:
    """The task-vector family's combine step, given each input's keep rule.

    ``base + lambda * (sum_i w_i r_i k_i d_i) / divisor`` where ``d_i`` is the delta, ``k_i`` the
    keep mask, ``r_i`` the L1 rescale factor (when ``rescale``), and, with ``consensus``, only the
    terms whose sign equals the sign of the sum take part and ``divisor`` sums their weights;
    without it ``divisor`` is the sum of all weights. Division happens only with ``normalize``.
    """
    b = inp.base
    assert b is not None
    base = inp.raw(b).reshape(-1)
    dtype = inp.compute_dtype
    n = base.numel()
    weights = [float(inp.per_input[i]["weight"]) for i in others]
    scales = [1.0] * len(others)
    if rescale:
        scales = _l1_rescale(inp, rules, others)
    coef = [w * r for w, r in zip(weights, scales)]
    normalize = bool(inp.shared["normalize"])
    lam = float(inp.shared["lambda"])
    total_w = sum(weights)
    flat_div = 1.0 if abs(total_w) < 1e-8 else total_w
    out = _out(inp, inp.raw(b).shape)
    flat_out = out.view(-1)

    def fn(lo: int, hi: int, s: _Scratch) -> None:
        m = hi - lo
        base_c = _f32(base, lo, hi, s, "base", dtype)
        wds = []
        for j, i in enumerate(others):
            d = _delta_chunk(inp, i, lo, hi, s, base_c, f"d{j}")
            keep = _kept(rules[j], d, lo, hi, s, f"k{j}")
            wd = s.get(f"wd{j}", m, dtype)
            torch.mul(d, coef[j], out=wd)
            if keep is not None:
                wd.mul_(keep)
            wds.append(wd)
        acc = s.get("acc", m, dtype)
        if consensus:
            total = s.get("sum", m, dtype)
            torch.add(wds[0], wds[1], out=total) if len(wds) > 1 else total.copy_(wds[0])
            for wd in wds[2:]:
                total.add_(wd)
            sign = s.get("sign", m, dtype)
            ge = s.get("ge", m, torch.bool)
            torch.ge(total, 0, out=ge)
            torch.mul(ge, 2.0, out=sign)
            sign.sub_(1.0)  # +1 where the sum is >= 0, else -1
            div = s.get("div", m, dtype) if normalize else None
            agree = s.get("agree", m, torch.bool)
            for j, wd in enumerate(wds):
                wd.mul_(sign)  # > 0 exactly where this term's sign equals the elected sign
                if div is not None:
                    torch.gt(wd, 0, out=agree)
                    if j == 0:
                        torch.mul(agree, weights[j], out=div)
                    else:
                        div.add_(agree, alpha=weights[j])
                wd.clamp_(min=0)
                acc.copy_(wd) if j == 0 else acc.add_(wd)
            acc.mul_(sign)
            if div is not None:
                div.masked_fill_(div == 0, 1.0)
                acc.div_(div)
        else:
            acc.copy_(wds[0])
            for wd in wds[1:]:
                acc.add_(wd)
            if normalize and flat_div != 1.0:
                acc.div_(flat_div)
        if lam != 1.0:
            acc.mul_(lam)
        acc.add_(base_c)
        flat_out[lo:hi].copy_(acc)

    run_chunks(n, base.device, fn)
    return out


def _l1_rescale(inp: TensorInputs, rules: list[Rule], others: list[int], eps: float = 1e-7) -> list[float]:
    """Per input: L1(delta) / L1(kept delta), or 1 where either norm is below ``eps`` (mergekit's rule)."""
    b = inp.base
    assert b is not None
    base = inp.raw(b).reshape(-1)
    dtype = inp.compute_dtype

    def fn(lo: int, hi: int, s: _Scratch) -> list[tuple[float, float]]:
        base_c = _f32(base, lo, hi, s, "base", dtype)
        res = []
        for j, i in enumerate(others):
            d = _delta_chunk(inp, i, lo, hi, s, base_c, f"d{j}")
            a = s.get("abs", hi - lo, dtype)
            torch.abs(d, out=a)
            before = float(a.sum())
            keep = _kept(rules[j], d, lo, hi, s, f"k{j}")
            after = before if keep is None else float(a.mul_(keep).sum())
            res.append((before, after))
        return res

    parts = run_chunks(base.numel(), base.device, fn)
    scales = []
    for j in range(len(others)):
        before = math.fsum(p[j][0] for p in parts)
        after = math.fsum(p[j][1] for p in parts)
        scales.append(1.0 if before < eps or after < eps else before / after)
    return scales


def abs_delta(inp: TensorInputs, i: int) -> torch.Tensor:
    """``|input i - base|`` as a new flat tensor in the compute dtype, written chunk by chunk."""
    b = inp.base
    assert b is not None
    x, base = inp.raw(i).reshape(-1), inp.raw(b).reshape(-1)
    dtype = inp.compute_dtype
    out = torch.empty(x.numel(), dtype=dtype, device=x.device)

    def fn(lo: int, hi: int, s: _Scratch) -> None:
        o = out[lo:hi]
        torch.sub(_f32(x, lo, hi, s, "x", dtype), _f32(base, lo, hi, s, "base", dtype), out=o)
        o.abs_()

    run_chunks(x.numel(), x.device, fn)
    return out

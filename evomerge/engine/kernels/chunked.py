"""Chunked, fused kernels for the methods that dominate merge time (task vectors, linear, slerp).

A kernel written as whole-tensor torch ops makes a dozen passes over each input, each allocating a
fresh tensor as large as the input: on a CPU that is memory bandwidth plus page faults, several
times the cost of reading the inputs once. Here a tensor is processed in chunks small enough to
stay in cache (``CHUNK`` elements): each input is read from memory once per pass, converted from
its stored dtype (bf16/f16) chunk by chunk, and the output is written once, in the output dtype,
straight into its destination (a resident model's parameter when there is one).

The arithmetic is the same as mergekit's whole-tensor formulation (see :mod:`evomerge.methods.registry`),
only reordered by chunks. Whole-tensor quantities (TIES thresholds, L1 norms for rescaling, slerp's
angle) are computed in a first pass, or taken from the :class:`~evomerge.engine.inputs.PrepCache`.

On CPU the chunks are shared among ``torch.get_num_threads()`` Python threads, each running
single-threaded torch ops (torch releases the GIL inside ops): small ops with intra-op threading
are slow, and badly so when other processes share the cores.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from evomerge.engine.kernels import compiled
from evomerge.engine.kernels.common import base_of, combine_scalars, out_tensor
from evomerge.engine.kernels.rules import KeepAbove, KeepAll, KeepRandom, KeepRule
from evomerge.engine.rng import uniform_range

if TYPE_CHECKING:
    from evomerge.engine.inputs import TensorInputs

__all__ = [
    "CHUNK",
    "SAMPLE",
    "check_weights",
    "run_chunks",
    "magnitude_rule",
    "rule_from_order",
    "fused_task_vectors",
    "fused_linear",
    "fused_slerp",
]

CHUNK = int(os.environ.get("EVOMERGE_CHUNK", 1 << 16))
_GPU_CHUNK = 1 << 22
_OUTER_THREADS = 0


@functools.lru_cache(maxsize=1)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="evomerge-chunk")


class _Scratch:
    """Per-worker reusable buffers (one set per thread, so no allocation per chunk)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = self.bufs.get((key, dtype))
        if b is None or b.numel() < n:
            b = torch.empty(
                max(n, CHUNK if self.device.type == "cpu" else 0), dtype=dtype, device=self.device
            )
            self.bufs[(key, dtype)] = b
            if key == "ones":  # never written
                b.fill_(1)
        return b[:n]


_LOCAL = threading.local()


def _scratch(device: torch.device) -> _Scratch:
    s: _Scratch | None = getattr(_LOCAL, "scratch", None)
    if s is None or s.device != device:
        s = _Scratch(device)
        _LOCAL.scratch = s
    return s


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run small whole-tensor ops on one thread: waking intra-op threads costs more than the op
    (milliseconds when other processes share the cores)."""
    global _OUTER_THREADS
    threads, outer = torch.get_num_threads(), _OUTER_THREADS
    _OUTER_THREADS = outer or threads  # run_chunks inside still uses every core
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _OUTER_THREADS = outer


def run_chunks(
    n: int, device: torch.device, fn: Callable[[int, int, _Scratch], Any], chunk: int | None = None
) -> list[Any]:
    """Call ``fn(lo, hi, scratch)`` over ``[0, n)`` in chunks; return the results in chunk order.

    ``chunk`` overrides the chunk size (:data:`CHUNK` entries on CPU); ``chunk=1`` calls ``fn``
    once per unit of work larger than a chunk (a fingerprint's rows), spread over the threads.
    """
    if device.type != "cpu":
        # GPU kernels need no cache blocking; chunks only bound the scratch memory.
        size = chunk or _GPU_CHUNK
        return [fn(lo, min(n, lo + size), _scratch(device)) for lo in range(0, n, size)]
    size = chunk or CHUNK
    if n <= size:
        return [fn(0, n, _scratch(device))]
    bounds = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
    threads = torch.get_num_threads()
    workers = max(1, min(_OUTER_THREADS or threads, len(bounds)))
    if workers == 1:
        return [fn(lo, hi, _scratch(device)) for lo, hi in bounds]
    per = math.ceil(len(bounds) / workers)
    groups = [bounds[i : i + per] for i in range(0, len(bounds), per)]

    def work(group: list[tuple[int, int]]) -> list[Any]:
        s = _scratch(device)
        return [fn(lo, hi, s) for lo, hi in group]

    torch.set_num_threads(1)
    try:
        parts = list(_pool(workers).map(work, groups))
    finally:
        torch.set_num_threads(threads)
    return [r for part in parts for r in part]


def _f32(
    x: torch.Tensor, lo: int, hi: int, s: _Scratch, key: str, dtype: torch.dtype
) -> torch.Tensor:
    """Chunk ``[lo, hi)`` of a flat input in the compute dtype (a view when already in it)."""
    c = x[lo:hi]
    if c.dtype == dtype:
        return c
    buf = s.get(key, hi - lo, dtype)
    buf.copy_(c)
    return buf


def check_weights(method: str, key: str, weights: list[float]) -> None:
    """Refuse to normalize by ``sum(weights)`` when that is undefined or meaningless.

    Args:
        method: the method's name, for the message.
        key: the parameter that turns normalizing on.
        weights: the weights.

    Raises:
        ValueError: the sum is 0, or below 1e-8 of ``sum(|w|)`` (``0.1 + 0.2 - 0.3``), where
            dividing would scale the inputs by 1e8 or more (mergekit divides and writes NaN/inf).
    """
    if abs(math.fsum(weights)) <= 1e-8 * math.fsum(abs(w) for w in weights):
        shown = ", ".join(f"{w:g}" for w in weights)
        raise ValueError(
            f"{method}: the weights ({shown}) sum to {sum(weights):g}, and {key} divides by that sum (mergekit would write NaN/inf); use weights that do not cancel out, or set {key}: false"
        )


def fused_linear(inp: TensorInputs) -> torch.Tensor:
    """``sum_i w_i x_i`` (divided by ``sum_i w_i`` when ``normalize``), chunk by chunk.

    Raises:
        ValueError: ``normalize`` is on and the weights cancel out (see :func:`check_weights`).
    """
    weights = [float(p["weight"]) for p in inp.per_input]
    if inp.shared["normalize"]:
        check_weights("linear", "normalize", weights)
    scale = 1.0 / sum(weights) if inp.shared["normalize"] else 1.0
    xs = [inp.raw(i).reshape(-1) for i in range(len(inp))]
    out = out_tensor(inp, inp.raw(0).shape)
    flat_out = out.view(-1)
    dtype = inp.compute_dtype

    def fn(lo: int, hi: int, s: _Scratch) -> bool:
        acc = s.get("acc", hi - lo, dtype)
        for i, (x, w) in enumerate(zip(xs, weights, strict=False)):
            c = _f32(x, lo, hi, s, "x", dtype)
            if i == 0:
                torch.mul(c, w * scale, out=acc)
            else:
                acc.add_(c, alpha=w * scale)
        return _write(acc, flat_out[lo:hi])

    inp.finite = all(run_chunks(xs[0].numel(), xs[0].device, fn))
    return out


def fused_slerp(inp: TensorInputs) -> torch.Tensor:
    """Slerp by ``t`` from the base to the other input, each one flattened vector: a reduction
    pass, then a blend pass; linear where the vectors are near colinear (|cos| > 0.9995)."""
    t, b = inp.shared["t"], base_of(inp)
    v0, v1 = inp.raw(b).reshape(-1), inp.raw(1 - b).reshape(-1)
    eps = 1e-8
    dtype = inp.compute_dtype

    def reduce(lo: int, hi: int, s: _Scratch) -> tuple[float, float, float]:
        # float64: products of float32 values are exact there, and the sums' rounding (1e-16)
        # stays far below float32's, so the coefficients come out the same on every device and
        # chunking (a float32 dot's order-dependent error, 1e-7, made CUDA and CPU differ).
        a = s.get("a64", hi - lo, torch.float64)
        b = s.get("b64", hi - lo, torch.float64)
        a.copy_(v0[lo:hi])
        b.copy_(v1[lo:hi])
        return float(torch.dot(a, b)), float(torch.dot(a, a)), float(torch.dot(b, b))

    parts = run_chunks(v0.numel(), v0.device, reduce)
    dot = math.fsum(p[0] for p in parts)
    n0 = math.sqrt(math.fsum(p[1] for p in parts))
    n1 = math.sqrt(math.fsum(p[2] for p in parts))
    n0 = n0 if n0 > eps else 1.0
    n1 = n1 if n1 > eps else 1.0
    cos = min(1.0, max(-1.0, dot / (n0 * n1)))
    if abs(cos) > 0.9995:
        c0, c1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        c0 = math.sin((1 - t) * theta) / math.sin(theta)
        c1 = math.sin(t * theta) / math.sin(theta)
    # The kernels multiply by the coefficients in the compute dtype: round them once, here.
    c0, c1 = (float(torch.tensor(c, dtype=torch.float64).to(dtype)) for c in (c0, c1))
    out = out_tensor(inp, inp.raw(b).shape)
    flat_out = out.view(-1)

    def blend(lo: int, hi: int, s: _Scratch) -> bool:
        acc = s.get("acc", hi - lo, dtype)
        torch.mul(_f32(v0, lo, hi, s, "a", dtype), c0, out=acc)
        acc.add_(_f32(v1, lo, hi, s, "b", dtype), alpha=c1)
        return _write(acc, flat_out[lo:hi])

    inp.finite = all(run_chunks(v0.numel(), v0.device, blend))
    return out


def _delta_chunk(
    inp: TensorInputs, i: int, lo: int, hi: int, s: _Scratch, base_c: torch.Tensor, key: str
) -> torch.Tensor:
    d = s.get(key, hi - lo, inp.compute_dtype)
    x = inp.raw(i).reshape(-1)[lo:hi]
    if x.dtype == d.dtype:
        torch.sub(x, base_c, out=d)
    else:
        d.copy_(x)
        d.sub_(base_c)
    return d


def _kept_delta(
    rule: KeepRule, d: torch.Tensor, lo: int, hi: int, s: _Scratch, key: str
) -> torch.Tensor:
    """The delta chunk with the entries ``rule`` drops set to 0 (``d`` itself when it keeps all).

    Float ops only: on CPU, comparisons that make bool tensors and float-by-bool products are
    several times slower than arithmetic on cache-resident chunks.
    """
    if isinstance(rule, KeepAll):
        return d
    kd = s.get(key, hi - lo, d.dtype)
    if isinstance(rule, KeepAbove):
        torch.hardshrink(d, rule.threshold, out=kd)  # d where |d| > threshold, else 0
        if rule.extra is not None:
            idx = rule.extra
            bounds = torch.tensor([lo, hi], dtype=idx.dtype, device=idx.device)
            a, b = torch.searchsorted(idx, bounds).tolist()
            if b > a:
                pos = idx[a:b] - lo
                kd[pos] = d[pos]
    elif isinstance(rule, KeepRandom):
        if rule.field is not None:
            u = rule.field.view(-1)[lo:hi]
        else:
            n = hi - lo
            scratch = (s.get("hx", n, torch.int64), s.get("ht", n, torch.int64), s.get("hu", n))
            u = uniform_range(*rule.keys, lo, hi, d.device, scratch)
        m = s.get(key + "m", hi - lo, d.dtype)
        torch.sub(u, rule.p, out=m)  # u - p < 0 exactly where u < p
        m.clamp_(max=0).sign_()  # -1 where kept, else 0
        torch.mul(d, m, out=kd).neg_()
    else:  # KeepMask
        torch.mul(d, rule.mask.view(-1)[lo:hi], out=kd)
    return kd


def _write(acc: torch.Tensor, out: torch.Tensor) -> bool:
    """Copy the compute-dtype chunk ``acc`` into the output chunk ``out``; return whether that is
    finite: a range check on ``acc`` (NaN fails it), confirmed on ``out`` only when it fails
    (rounding near the output dtype's maximum)."""
    out.copy_(acc)
    lim = torch.finfo(out.dtype).max
    mn, mx = torch.aminmax(acc)
    if float(mn) >= -lim and float(mx) <= lim:
        return True
    return bool(torch.isfinite(out).all())


def fused_task_vectors(
    inp: TensorInputs, rules: list[KeepRule], others: list[int], consensus: bool, rescale: bool
) -> torch.Tensor:
    """The task-vector family's combine step, given each input's keep rule.

    ``base + lambda * (sum_i w_i r_i k_i d_i) / divisor`` where ``d_i`` is the delta, ``k_i`` its
    keep rule (:mod:`~evomerge.engine.kernels.rules`), ``r_i`` the L1 rescale factor (when
    ``rescale``), and, with ``consensus``, only the terms whose sign equals the sign of the sum
    take part and ``divisor`` sums their weights; without it ``divisor`` is the sum of all weights.
    Division happens only with ``normalize``. Sets ``inp.finite``.
    """
    result = compiled.compiled_task_vectors(inp, rules, others, consensus, rescale)
    if result is not None:
        return result
    b = base_of(inp)
    base = inp.raw(b).reshape(-1)
    dtype = inp.compute_dtype
    n = base.numel()
    weights, coef, flat_div = combine_scalars(
        inp, others, _l1_rescale(inp, rules, others) if rescale else None
    )
    normalize = bool(inp.shared["normalize"])
    lam = float(inp.shared["lambda"])
    out = out_tensor(inp, inp.raw(b).shape)
    flat_out = out.view(-1)

    def fn(lo: int, hi: int, s: _Scratch) -> bool:
        m = hi - lo
        base_c = _f32(base, lo, hi, s, "base", dtype)
        wds = []
        for j, i in enumerate(others):
            d = _delta_chunk(inp, i, lo, hi, s, base_c, f"d{j}")
            kd = _kept_delta(rules[j], d, lo, hi, s, f"k{j}")
            wd = s.get(f"wd{j}", m, dtype)
            torch.mul(kd, coef[j], out=wd)
            wds.append(wd)
        acc = s.get("acc", m, dtype)
        if consensus:
            total = s.get("sum", m, dtype)
            torch.add(wds[0], wds[1], out=total) if len(wds) > 1 else total.copy_(wds[0])
            for wd in wds[2:]:
                total.add_(wd)
            sign = s.get("sign", m, dtype)
            # +1 where the sum is >= 0, else -1. The sum is -0 only when every term is 0, and then
            # no term takes part whichever sign is elected.
            torch.copysign(s.get("ones", m, dtype), total, out=sign)
            div = s.get("div", m, dtype) if normalize else None
            took = s.get("took", m, dtype)
            for j, wd in enumerate(wds):
                wd.mul_(sign).clamp_(min=0)  # > 0 exactly where this term's sign is the elected one
                if div is not None:
                    torch.sign(wd, out=took)  # 1 where it takes part, else 0
                    torch.mul(took, weights[j], out=div) if j == 0 else div.add_(
                        took, alpha=weights[j]
                    )
                acc.copy_(wd) if j == 0 else acc.add_(wd)
            acc.mul_(sign)
            if div is not None:
                # A divisor of 0 becomes 1: div - (|sign(div)| - 1) is div where it is not 0, else 1.
                torch.sign(div, out=took)
                took.abs_().sub_(1.0)
                div.sub_(took)
                acc.div_(div)
        else:
            acc.copy_(wds[0])
            for wd in wds[1:]:
                acc.add_(wd)
            if flat_div != 1.0:
                acc.div_(flat_div)
        if lam != 1.0:
            acc.mul_(lam)
        acc.add_(base_c)
        return _write(acc, flat_out[lo:hi])

    inp.finite = all(run_chunks(n, base.device, fn))
    return out


def _l1_rescale(
    inp: TensorInputs, rules: list[KeepRule], others: list[int]
) -> list[tuple[float, float]]:
    """Per input: ``(L1(delta), L1(kept delta))``, summed in float64."""
    b = base_of(inp)
    base = inp.raw(b).reshape(-1)
    dtype = inp.compute_dtype

    def fn(lo: int, hi: int, s: _Scratch) -> list[tuple[float, float]]:
        base_c = _f32(base, lo, hi, s, "base", dtype)
        res = []
        for j, i in enumerate(others):
            d = _delta_chunk(inp, i, lo, hi, s, base_c, f"d{j}")
            kd = _kept_delta(rules[j], d, lo, hi, s, f"k{j}")
            # float64 sums: the compiled kernel sums in another order, and must get the same factor
            after = float(kd.abs().sum(dtype=torch.float64))
            before = after if kd is d else float(d.abs_().sum(dtype=torch.float64))
            res.append((before, after))
        return res

    parts = run_chunks(base.numel(), base.device, fn)
    return [
        (math.fsum(p[j][0] for p in parts), math.fsum(p[j][1] for p in parts))
        for j in range(len(others))
    ]


# Sample size for bracketing a TIES threshold; tensors up to _WHOLE elements are not sampled.
# A larger sample leaves fewer entries in the bracket to sort exactly, but drawing it is a random
# gather from both inputs; this size balances the two on a TIES merge (bench/bench_merge.py).
SAMPLE = 1 << 14
_WHOLE = 1 << 18


@functools.lru_cache(maxsize=64)
def _sample_idx(n: int, device: torch.device, size: int) -> torch.Tensor:
    """``size`` fixed random positions in ``[0, n)`` (seeded by ``n``)."""
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, n, (size,), generator=g).to(device)


def _below(x: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below ``x`` (so that ``|d| > result`` means ``|d| >= x``)."""
    t = torch.tensor(x, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)))


def magnitude_rule(inp: TensorInputs, i: int, k: int) -> KeepAll | KeepAbove:
    """Keep rule for the exact top ``k`` entries of ``|input i - base|`` (ties kept in index order).

    The k-th largest value is found without sorting or a whole-tensor selection: a random sample
    brackets it (bounds a few standard errors either side of its quantile), one chunked pass
    counts the entries above the bracket and collects those inside it (a few percent), and the
    selection runs on those. Should the bracket miss (a sample far off), the pass is repeated with
    an unbounded bracket, so the answer is exact either way. The sample only affects speed.
    """
    b = base_of(inp)
    x, base = inp.raw(i).reshape(-1), inp.raw(b).reshape(-1)
    n, dtype = x.numel(), inp.compute_dtype
    if k >= n:
        return KeepAll()
    with single_threaded() if x.device.type == "cpu" else contextlib.nullcontext():
        lo_v, hi_v = _sample_bracket(x, base, k, dtype) if n > _WHOLE else (0.0, math.inf)
        above, cidx, cval = _bracket_pass(inp, i, lo_v, hi_v)
        need = k - above  # the answer's rank from the top among the candidates
        if not 1 <= need <= cval.numel():
            above, cidx, cval = _bracket_pass(inp, i, 0.0, math.inf)
            need = k
            if cval.numel() < n:  # NaN never compares >= 0
                raise ValueError(f"the task vector of input {i} has NaN values")
        thr = float(torch.kthvalue(cval, cval.numel() - need + 1).values)
        n_gt = above + int(torch.count_nonzero(cval > thr))
        eq = cval == thr
        if n_gt + int(torch.count_nonzero(eq)) == k:
            return KeepAbove(_below(thr, dtype)) if thr > 0 else KeepAll()
        return KeepAbove(thr, cidx[eq][: k - n_gt].contiguous())


def rule_from_order(inp: TensorInputs, i: int, k: int, order: torch.Tensor) -> KeepAll | KeepAbove:
    """The same rule as :func:`magnitude_rule`, read off a cached stable descending order of
    ``|input i - base|`` (``order``): the top k are ``order[:k]``; the entries tied with the k-th
    form a run ending at k, found by binary search on values gathered from the inputs."""
    b = base_of(inp)
    x, base = inp.raw(i).reshape(-1), inp.raw(b).reshape(-1)
    n, dtype = x.numel(), inp.compute_dtype
    if k >= n:
        return KeepAll()

    def mag(j: int) -> float:
        # |delta| in the compute dtype, exactly as the order and the combine see it
        p = int(order[j])
        return float((x[p].to(dtype) - base[p].to(dtype)).abs())

    thr = mag(k - 1)
    # the first j with mag(j) == thr (values are non-increasing along the order)
    start = bisect.bisect_left(range(k - 1), -thr, key=lambda j: -mag(j))
    if mag(k) < thr:  # nothing past k ties with it: the top k are exactly |d| >= thr
        return KeepAbove(_below(thr, dtype)) if thr > 0 else KeepAll()
    return KeepAbove(thr, torch.sort(order[start:k].to(torch.int64)).values)


def _sample_bracket(
    x: torch.Tensor, base: torch.Tensor, k: int, dtype: torch.dtype
) -> tuple[float, float]:
    """Bounds that very likely hold the k-th largest ``|x - base|``, from a fixed random sample."""
    n = x.numel()
    idx = _sample_idx(n, x.device, SAMPLE)
    sample = (x[idx].to(dtype) - base[idx].to(dtype)).abs_()
    m = SAMPLE
    q = (n - k) / n  # the answer's quantile, ascending
    margin = 5.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m  # 5 standard errors
    ilo, ihi = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo_v = float(torch.kthvalue(sample, ilo + 1).values) if ilo > 0 else 0.0
    hi_v = float(torch.kthvalue(sample, ihi + 1).values) if ihi < m else math.inf
    return lo_v, hi_v


def _bracket_pass(
    inp: TensorInputs, i: int, lo_v: float, hi_v: float
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count ``|delta_i| > hi_v``; return it with the flat positions and values in ``[lo_v, hi_v]``."""
    b = base_of(inp)
    base = inp.raw(b).reshape(-1)
    bounded = hi_v != math.inf

    def fn(lo: int, hi: int, s: _Scratch) -> tuple[int, torch.Tensor, torch.Tensor]:
        m = hi - lo
        base_c = _f32(base, lo, hi, s, "base", inp.compute_dtype)
        a = _delta_chunk(inp, i, lo, hi, s, base_c, "a").abs_()
        inside = s.get("in", m, torch.bool)
        torch.ge(a, lo_v, out=inside)
        above = 0
        if bounded:
            le = s.get("le", m, torch.bool)
            torch.le(a, hi_v, out=le)
            above = m - int(torch.count_nonzero(le))
            inside.logical_and_(le)
        pos = torch.nonzero(inside).view(-1)
        return above, pos + lo, a[pos]

    parts = run_chunks(base.numel(), base.device, fn)
    above = sum(p[0] for p in parts)
    return above, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])

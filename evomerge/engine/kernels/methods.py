"""The kernel of every merge method: ``TensorInputs -> Tensor``, chosen by the method's name and data.

Each kernel takes the inputs of one output tensor (float32 compute, same shape, same device) with
their resolved parameters and returns the merged tensor. The methods that dominate merge time
(linear, slerp, the task-vector family) run the chunked kernels of
:mod:`evomerge.engine.kernels.chunked`; the others are whole-tensor torch code written after
mergekit 0.1.5's formulas (nearswap, arcee_fusion, ram and ramplus_tl in
:mod:`evomerge.engine.kernels.extra`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial

import torch

from evomerge.engine.inputs import TensorInputs
from evomerge.engine.kernels.chunked import (
    check_weights,
    fused_linear,
    fused_slerp,
    fused_task_vectors,
)
from evomerge.engine.kernels.common import base_of
from evomerge.engine.kernels.extra import EXTRA_KERNELS
from evomerge.engine.kernels.rules import KeepAll, KeepMask, KeepRule
from evomerge.methods.registry import METHODS
from evomerge.methods.spec import Sparsifier

__all__ = ["KERNELS"]

Kernel = Callable[[TensorInputs], torch.Tensor]


def _outliers(inp: TensorInputs, i: int, density: float, n: int) -> KeepRule:
    # Breadcrumbs: drop the top gamma fraction by |delta|, then the smallest, keeping int(density n).
    delta = inp.delta(i)
    target, n_top = int(density * n), int(inp.per_input[i]["gamma"] * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bot : n_bot + target]] = True
    return KeepMask(mask.reshape(delta.shape))


def _della(inp: TensorInputs, i: int, density: float, n: int) -> KeepRule:
    # Keep with probabilities from density - epsilon to density + epsilon, ranked by |delta| in
    # each row (of the first axis; a 1-D tensor is one row), drawn from the input's U[0, 1) field.
    delta, eps = inp.delta(i), inp.per_input[i]["epsilon"]
    if density - eps <= 0 or density + eps >= 1:
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1, got density={density:g}, epsilon={eps:g}"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
    probs = (density - eps) + (ranks / max(rows.shape[1] - 1, 1)) * (2 * eps)
    return KeepMask((inp.uniform(i).reshape(rows.shape) < probs).reshape(delta.shape))


# How each sparsifier keeps entries of input i's task vector of n entries at a density below 1.
_SPARSIFY: dict[Sparsifier, Callable[[TensorInputs, int, float, int], KeepRule]] = {
    # The top k = int(density * n) entries by |delta| (at least one).
    Sparsifier.MAGNITUDE: lambda inp, i, d, n: inp.magnitude_rule(i, max(1, int(d * n))),
    # Where the input's fixed U[0, 1) field is below density: Bernoulli(density).
    Sparsifier.RANDOM: lambda inp, i, d, n: inp.random_rule(i, d),
    Sparsifier.MAGNITUDE_OUTLIERS: _outliers,
    Sparsifier.DELLA: _della,
}


def _task_vectors(
    sparsifier: Sparsifier | None, consensus: bool, inp: TensorInputs
) -> torch.Tensor:
    b = base_of(inp)
    others = [i for i in range(len(inp)) if i != b]
    if not others:
        return inp.tensor(b).clone()
    rules: list[KeepRule] = []
    for i in others:
        density, n = inp.per_input[i]["density"], inp.raw(i).numel()
        if sparsifier is None or density >= 1 or n == 0:
            rules.append(KeepAll())
        else:
            rules.append(_SPARSIFY[sparsifier](inp, i, density, n))
    rescale = bool(inp.shared["rescale"]) and sparsifier is not None
    return fused_task_vectors(inp, rules, others, consensus, rescale)


def _passthrough(inp: TensorInputs) -> torch.Tensor:
    scale = inp.per_input[0].get("scale")
    x = inp.tensor(0)
    return x if scale is None else x * scale


def _model_stock(inp: TensorInputs) -> torch.Tensor:
    b = base_of(inp)
    w0 = inp.tensor(b)
    ws = [inp.tensor(i) for i in range(len(inp)) if i != b]
    shape = w0.shape
    if inp.shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for u, v in itertools.combinations(offsets, 2):
        norms = torch.linalg.vector_norm(u, dim=-1) * torch.linalg.vector_norm(v, dim=-1)
        cosines.append(((u * v).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    # Model Stock's interpolation ratio t = N cos / (1 + (N-1) cos); keep the base where undefined.
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denom))
    average = torch.stack(ws).mean(0)
    return (t * average + (1 - t) * w0).reshape(shape)


def _nuslerp_vectors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _nuslerp(inp: TensorInputs) -> torch.Tensor:
    b = inp.base
    others = [i for i in range(len(inp)) if i != b]
    w = [inp.per_input[i]["weight"] for i in others]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    row_wise, flatten = inp.shared["nuslerp_row_wise"], inp.shared["nuslerp_flatten"]
    x0, x1 = inp.tensor(others[0]), inp.tensor(others[1])
    if b is None:
        return _nuslerp_vectors(t, x0, x1, row_wise, flatten)
    base = inp.tensor(b)
    return base + _nuslerp_vectors(t, x0 - base, x1 - base, row_wise, flatten)


def _multislerp(inp: TensorInputs) -> torch.Tensor:
    b = inp.base
    others = [i for i in range(len(inp)) if i != b]
    if len(others) == 1:
        return inp.tensor(others[0]).clone()
    eps = inp.shared["eps"]
    x = torch.stack([inp.tensor(i) for i in others])
    if b is not None:
        x = x - inp.tensor(b)
    flat = x.reshape(x.shape[0], -1)
    weights = [float(inp.per_input[i]["weight"]) for i in others]
    if inp.shared["normalize_weights"]:
        check_weights("multislerp", "normalize_weights", weights)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if inp.shared["normalize_weights"]:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(others) == 2:
            out = (x[0] * w[0] + x[1] * w[1]).reshape(x.shape[1:])
            return out + inp.tensor(b) if b is not None else out
        raise ValueError(
            "multislerp: the weighted sum of the input directions is zero (antipodal inputs with balancing weights); change the weights"
        )
    mean = mean / mean_norm
    # Barycentre on the sphere: project to the tangent space at the mean, average, map back.
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent_mean = (tangent * w[:, None]).sum(0)
    tn = torch.linalg.vector_norm(tangent_mean) + eps
    result = mean * torch.cos(tn) + tangent_mean * (torch.sin(tn) / tn)
    result = (result * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    return result + inp.tensor(b) if b is not None else result


def _karcher(inp: TensorInputs) -> torch.Tensor:
    xs = [inp.tensor(i) for i in range(len(inp))]
    if len(xs) == 1:
        return xs[0].clone()
    max_iter, tol = inp.shared["max_iter"], inp.shared["tol"]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [
        x / n if n.item() != 0 else torch.zeros_like(x) for x, n in zip(xs, norms, strict=False)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    va = [alphas[i] for i in valid]
    va = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(va, vu, strict=False))
    mn = torch.linalg.vector_norm(mean)
    mean = vu[0].clone() if mn.item() < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, vu, strict=False):
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tnorm = torch.linalg.vector_norm(tangent)
        if tnorm.item() < tol:
            break
        mean = torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)
        un = torch.linalg.vector_norm(mean)
        if un.item() > tol:
            mean = mean / un
    return sum(a * n for a, n in zip(alphas, norms, strict=False)) * mean


def _sce(inp: TensorInputs) -> torch.Tensor:
    b = base_of(inp)
    base = inp.tensor(b)
    others = [i for i in range(len(inp)) if i != b]
    if not others:
        return base.clone()
    tvs = torch.stack([inp.delta(i) for i in others])
    topk = inp.shared["select_topk"]
    if topk < 1:
        # Select: keep the elements where the task vectors vary most across models.
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var).item() * topk)
        mask = torch.zeros(var.numel(), dtype=tvs.dtype, device=tvs.device)
        if k > 0:
            mask[torch.topk(var.abs().reshape(-1), k=k).indices] = 1
        tvs = tvs * mask.reshape(var.shape)
    # Calculate: weight each task vector by its mean squared magnitude.
    energy = tvs.square().reshape(len(others), -1).mean(1)
    total = energy.sum().item()
    weights = torch.full_like(energy, 1 / len(others)) if abs(total) < 1e-6 else energy / total
    # Erase: drop entries disagreeing with the elected sign (+1 where the sum is >= 0, else -1).
    summed = torch.zeros_like(tvs[0])
    for tv in tvs:
        summed.add_(tv)  # in input order, one add each: the same rounding on every path
    elected = torch.where(summed >= 0, 1.0, -1.0).to(tvs.dtype)
    keep = (torch.sign(tvs) == elected).to(tvs.dtype)
    w = weights.reshape(-1, *([1] * (tvs.dim() - 1))) * keep
    return base + (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)


_DENSE: dict[str, Kernel] = {
    "linear": fused_linear,
    "slerp": fused_slerp,
    "model_stock": _model_stock,
    "nuslerp": _nuslerp,
    "multislerp": _multislerp,
    "karcher": _karcher,
    "sce": _sce,
    "passthrough": _passthrough,
    **EXTRA_KERNELS,
}

# One kernel per registered method, by name: the task-vector family is one kernel parametrised by
# its data.
KERNELS: dict[str, Kernel] = {
    name: _DENSE[name] if name in _DENSE else partial(_task_vectors, m.sparsifier, m.consensus)
    for name, m in METHODS.items()
}

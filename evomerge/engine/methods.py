"""Merge methods: what each one declares, and its tensor math.

A method is data plus one pure function. The data (:class:`Method`) says which parameters it takes,
at what scope, with which defaults and allowed values, and how many inputs and whether a base it
needs: recipes and search spaces are validated against it before any tensor moves. The function
takes one :class:`~evomerge.engine.inputs.TensorInputs` (the input tensors of one output tensor, in
float32, with resolved parameters) and returns the merged tensor.

The semantics follow mergekit 0.1.5 so that a recipe means the same thing in both tools. The
task-vector family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) is one generalized method
whose variants differ only by data: a sparsifier, sign consensus on or off, and defaults.

Everything is in torch on the inputs' device; no numpy round trips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from evomerge.engine.inputs import TensorInputs

__all__ = [
    "REQUIRED",
    "Param",
    "Method",
    "METHODS",
    "get_method",
    "slerp_tensors",
    "sign_consensus",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Scopes: "shared" params have one value per tensor; "input" params one per input model;
# "non_base" params one per input model other than the base (the base's value is never read).
SCOPES = ("shared", "input", "non_base")


@dataclass(frozen=True)
class Param:
    """A parameter a method accepts.

    Attributes:
        name: key in a recipe's ``parameters:``.
        kind: ``float``, ``int`` or ``bool``.
        scope: ``"shared"``, ``"input"`` or ``"non_base"`` (see ``SCOPES``).
        default: value when no recipe level sets it; ``REQUIRED`` makes it mandatory.
        low, high: bounds for numbers; ``low_open``/``high_open`` exclude the bound itself.
        optional: the value may be null (``scale`` of passthrough).
    """

    name: str
    kind: type
    scope: str = "shared"
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def allowed(self) -> str:
        """Human description of the allowed values, for error messages."""
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            return what
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{what} in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any) -> Any:
        """Coerce one scalar to this parameter's kind, or raise ``ValueError`` saying what is allowed."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"must be {self.allowed()}, got null")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"must be true or false, got {value!r}")
        if isinstance(value, bool):
            raise ValueError(f"must be {self.allowed()}, got {str(value).lower()}")
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string; mergekit accepts such numbers too.
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be {self.allowed()}, got {value!r}") from None
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"must be {self.allowed()}, got {value!r}")
        if self.kind is int:
            if float(value) != int(value):
                raise ValueError(f"must be {self.allowed()}, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(f"must be {self.allowed()}, got {value:g}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(f"must be {self.allowed()}, got {value:g}")
        return value


@dataclass(frozen=True)
class Method:
    """A merge method: its declaration and its kernel.

    Attributes:
        name: the ``merge_method`` string.
        params: what it accepts.
        base: ``"required"`` (the base must be among the inputs), ``"optional"`` (used when given)
            or ``"ignored"`` (a base_model in the recipe plays no special role).
        min_inputs, max_inputs, min_non_base, max_non_base: input counts per output tensor.
        kernel: ``TensorInputs -> Tensor``.
        random: draws random masks (seeded by ``--seed`` and the tensor name).
        task_vectors: works on ``model - base`` deltas (the in-memory merger caches them).
    """

    name: str
    params: tuple[Param, ...]
    kernel: Callable[[TensorInputs], torch.Tensor]
    base: str = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    random: bool = False
    task_vectors: bool = False
    reference: str = ""
    mergekit: bool = True
    _by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    def param(self, name: str) -> Param | None:
        return self._by_name.get(name)

    def check_inputs(self, n_inputs: int, has_base: bool) -> str | None:
        """Return why ``n_inputs`` inputs (one of them the base if ``has_base``) are not allowed, or None."""
        if self.base == "required" and not has_base:
            return f"merge_method {self.name} needs a base_model that is one of the merged models"
        non_base = n_inputs - int(has_base and self.base != "ignored")
        if n_inputs < self.min_inputs:
            return f"merge_method {self.name} needs at least {self.min_inputs} models, got {n_inputs}"
        if self.max_inputs is not None and n_inputs > self.max_inputs:
            exact = "exactly" if self.max_inputs == self.min_inputs else "at most"
            return f"merge_method {self.name} takes {exact} {self.max_inputs} model(s), got {n_inputs}"
        if self.min_non_base is not None and non_base < self.min_non_base:
            return f"merge_method {self.name} needs at least {self.min_non_base} models besides the base, got {non_base}"
        if self.max_non_base is not None and non_base > self.max_non_base:
            exact = "exactly" if self.max_non_base == self.min_non_base else "at most"
            return f"merge_method {self.name} takes {exact} {self.max_non_base} models besides the base, got {non_base}"
        return None


# --------------------------------------------------------------------------------------------
# Kernels. Each takes the inputs of one output tensor (float32, same shape, same device).


def _linear(inp: TensorInputs) -> torch.Tensor:
    from evomerge.engine.fused import fused_linear

    return fused_linear(inp)


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors, each taken as one flattened vector.

    Interpolates the raw vectors (not their unit directions) with the angle between them; falls
    back to linear interpolation when they are nearly collinear (|cos| > ``dot_threshold``).

    Example:
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> slerp_tensors(0.5, a, b)
        tensor([0.7071, 0.7071])
    """
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    n0 = n0 if n0 > eps else torch.ones_like(n0)
    n1 = n1 if n1 > eps else torch.ones_like(n1)
    dot = (torch.dot(v0.reshape(-1), v1.reshape(-1)) / (n0 * n1)).clamp(-1.0, 1.0).item()
    if abs(dot) > dot_threshold:
        return torch.lerp(v0, v1, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    c0 = math.sin((1 - t) * theta) / sin_theta
    c1 = math.sin(t * theta) / sin_theta
    return v0 * c0 + v1 * c1


def _slerp(inp: TensorInputs) -> torch.Tensor:
    from evomerge.engine.fused import fused_slerp

    b = inp.base
    assert b is not None  # guaranteed by the method's declaration, checked at plan time
    return fused_slerp(inp, inp.shared["t"], b, 1 - b)


def sign_consensus(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: +1 where the sum of the weighted deltas is >= 0, else -1."""
    total = torch.zeros_like(weighted_deltas[0])
    for d in weighted_deltas:
        total.add_(d)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def _keep_rule(inp: TensorInputs, i: int, kind: str | None) -> tuple[Any, ...]:
    """How input ``i``'s task vector is sparsified, as a rule the fused combine applies chunk by chunk.

    ``magnitude`` keeps the top k = int(density * n) entries by |delta| (at least one); ``random``
    keeps where a fixed U[0, 1) field is below density (Bernoulli(density)); ``magnitude_outliers``
    drops the top ``gamma`` fraction and then the smallest entries to keep int(density * n);
    ``della`` keeps with probabilities ranked by |delta| within each row from density - epsilon
    to density + epsilon.
    """
    p = inp.per_input[i]
    density = p["density"]
    if kind is None or density >= 1:
        return ("all",)
    n = inp.raw(i).numel()
    if n == 0:
        return ("all",)
    if kind == "magnitude":
        return inp.magnitude_rule(i, max(1, int(density * n)))
    if kind == "random":
        return ("lt_uniform", inp.uniform(i), density)
    delta = inp.delta(i)
    if kind == "magnitude_outliers":
        target = int(density * n)
        n_top = int(p["gamma"] * n)
        n_bot = max(0, n - target - n_top)
        order = torch.sort(delta.abs().reshape(-1), stable=True).indices
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        mask[order[n_bot : n_bot + target]] = True
        return ("mask", mask.reshape(delta.shape))
    if kind == "della":
        eps = p["epsilon"]
        if density - eps <= 0 or density + eps >= 1:
            raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1, got density={density:g}, epsilon={eps:g}")
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
        ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
        width = max(rows.shape[1] - 1, 1)
        probs = (density - eps) + (ranks / width) * (2 * eps)
        return ("mask", (inp.uniform(i).reshape(rows.shape) < probs).reshape(delta.shape))
    raise ValueError(kind)  # pragma: no cover - the registry only uses the kinds above


def _task_vector_kernel(sparsifier: str | None, consensus: bool) -> Callable[[TensorInputs], torch.Tensor]:
    def kernel(inp: TensorInputs) -> torch.Tensor:
        from evomerge.engine.fused import fused_task_vectors

        b = inp.base
        assert b is not None
        others = [i for i in range(len(inp)) if i != b]
        if not others:
            return inp.tensor(b).clone()
        rules = [_keep_rule(inp, i, sparsifier) for i in others]
        rescale = bool(inp.shared["rescale"]) and sparsifier is not None
        return fused_task_vectors(inp, rules, others, consensus, rescale)

    return kernel


def _passthrough(inp: TensorInputs) -> torch.Tensor:
    scale = inp.per_input[0].get("scale")
    x = inp.tensor(0)
    return x if scale is None else x * scale


def _model_stock(inp: TensorInputs) -> torch.Tensor:
    b = inp.base
    assert b is not None
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
    for a in range(len(offsets)):
        for c in range(a + 1, len(offsets)):
            norms = torch.linalg.vector_norm(offsets[a], dim=-1) * torch.linalg.vector_norm(offsets[c], dim=-1)
            cosines.append(((offsets[a] * offsets[c]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    # Model Stock's interpolation ratio t = N cos / (1 + (N-1) cos); keep the base where undefined.
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denom))
    average = torch.stack(ws).mean(0)
    return (t * average + (1 - t) * w0).reshape(shape)


def _nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
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
    w = torch.tensor([inp.per_input[i]["weight"] for i in others], dtype=x.dtype, device=x.device)
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
        raise ValueError("multislerp: the weighted sum of the input directions is zero (antipodal inputs with balancing weights); change the weights")
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
    units = [x / n if n.item() != 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    va = [alphas[i] for i in valid]
    va = [a / sum(va) for a in va]
    vu = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(va, vu))
    mn = torch.linalg.vector_norm(mean)
    mean = vu[0].clone() if mn.item() < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, vu):
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
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def _sce(inp: TensorInputs) -> torch.Tensor:
    b = inp.base
    assert b is not None
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
    # Erase: drop entries disagreeing with the elected sign.
    elected = sign_consensus(list(tvs))
    keep = (torch.sign(tvs) == elected).to(tvs.dtype)
    w = weights.reshape(-1, *([1] * (tvs.dim() - 1))) * keep
    return base + (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)


# --------------------------------------------------------------------------------------------
# The registry: one explicit dict, nothing registered by import side effects.

_UNIT = {"low": 0.0, "high": 1.0}
_DENSITY = Param("density", float, "non_base", 1.0, low=0.0, high=1.0, low_open=True, help="fraction of each task vector kept")
_WEIGHT = Param("weight", float, "non_base", help="scale of each task vector")
_TV_SHARED = (
    Param("normalize", bool, "shared", False, help="divide by the sum of the weights that took part"),
    Param("rescale", bool, "shared", False, help="rescale kept entries to the original L1 norm"),
    Param("int8_mask", bool, "shared", False, help="accepted for mergekit compatibility (memory only)"),
    Param("lambda", float, "shared", 1.0, help="scale of the merged task vector"),
)


def _task_vector_method(name: str, sparsifier: str | None, consensus: bool, normalize: bool, rescale: bool, reference: str) -> Method:
    shared = tuple(
        Param(p.name, p.kind, p.scope, {"normalize": normalize, "rescale": rescale}.get(p.name, p.default), help=p.help)
        for p in _TV_SHARED
    )
    extra: tuple[Param, ...] = ()
    if sparsifier == "magnitude_outliers":
        extra = (Param("gamma", float, "non_base", 0.01, low=0.0, high=1.0, high_open=True, help="fraction of largest entries dropped"),)
    elif sparsifier == "della":
        extra = (Param("epsilon", float, "non_base", 0.15, low=0.0, high=1.0, high_open=True, help="spread of keep probabilities around density"),)
    return Method(
        name=name,
        params=shared + (_WEIGHT, _DENSITY) + extra,
        kernel=_task_vector_kernel(sparsifier, consensus),
        base="required",
        random=sparsifier in ("random", "della"),
        task_vectors=True,
        reference=reference,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
            _linear,
            reference="https://arxiv.org/abs/2203.05482",
        ),
        Method("slerp", (Param("t", float, "shared"),), _slerp, base="required", min_inputs=2, max_inputs=2, reference="https://en.wikipedia.org/wiki/Slerp"),
        _task_vector_method("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
        _task_vector_method("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
        _task_vector_method("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
        _task_vector_method("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
        _task_vector_method("breadcrumbs", "magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
        _task_vector_method("breadcrumbs_ties", "magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
        _task_vector_method("della", "della", True, True, True, "https://arxiv.org/abs/2406.11617"),
        _task_vector_method("della_linear", "della", False, False, True, "https://arxiv.org/abs/2406.11617"),
        Method(
            "model_stock",
            (Param("filter_wise", bool, "shared", False),),
            _model_stock,
            base="required",
            min_inputs=3,
            reference="https://arxiv.org/abs/2403.19522",
        ),
        Method(
            "nuslerp",
            (
                Param("weight", float, "non_base"),
                Param("nuslerp_row_wise", bool, "shared", False),
                Param("nuslerp_flatten", bool, "shared", True),
            ),
            _nuslerp,
            base="optional",
            min_non_base=2,
            max_non_base=2,
        ),
        Method(
            "multislerp",
            (
                Param("weight", float, "non_base"),
                Param("normalize_weights", bool, "shared", True),
                Param("eps", float, "shared", 1e-8, low=0.0, low_open=True),
            ),
            _multislerp,
            base="optional",
            min_non_base=1,
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        ),
        Method(
            "karcher",
            (Param("max_iter", int, "shared", 10, low=1), Param("tol", float, "shared", 1e-5, low=0.0, low_open=True)),
            _karcher,
        ),
        Method(
            "sce",
            (Param("int8_mask", bool, "shared", False), Param("select_topk", float, "shared", 1.0, **_UNIT, low_open=True)),
            _sce,
            base="required",
            reference="https://arxiv.org/abs/2408.07990",
        ),
        Method("passthrough", (Param("scale", float, "input", None, optional=True),), _passthrough, max_inputs=1),
    )
}

# Names that exist elsewhere but are not merge methods of this tool, with the reason.
NOT_METHODS = {
    "moe": "`moe` builds a mixture of experts, a different tool (mergekit-moe); evomerge merges dense models",
    "nearswap": "nearswap is not supported by evomerge",
    "ram": "ram is not supported by evomerge",
    "ramplus_tl": "ramplus_tl is not supported by evomerge",
    "arcee_fusion": "arcee_fusion is not supported by evomerge",
}


def get_method(name: str) -> Method:
    """Look up a method by name.

    Raises:
        KeyError: with a message naming close matches (callers turn it into a ConfigError).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(name) from None

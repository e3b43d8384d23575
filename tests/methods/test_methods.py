"""Merge methods and parameter resolution against values worked out by hand.

Kernel tests feed a method a few small tensors and compare with numbers computed on paper (the
working is in the comments). Model-level tests use tiny models from ``tests/_tiny.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import make_tiny, perturbed
from safetensors.torch import load_file, save_file

from evomerge.engine import (
    METHODS,
    Merger,
    digest_model_dir,
    make_plan,
    merge_to_disk,
    open_sources,
)
from evomerge.engine.inputs import TensorInputs
from evomerge.engine.kernels.methods import KERNELS
from evomerge.engine.kernels.rules import KeepAbove
from evomerge.engine.params import evaluate_setting
from evomerge.errors import EvomergeError
from evomerge.recipe.schema import load_recipe

S2 = math.sqrt(0.5)


def run(
    method: str,
    tensors: list[list[float]] | list[torch.Tensor],
    *,
    base: int | None = None,
    shared: dict[str, Any] | None = None,
    per: list[dict[str, Any]] | None = None,
    seed: int = 0,
    name: str = "t.weight",
) -> torch.Tensor:
    """Run one method's kernel on small tensors, with the method's defaults for unset parameters."""
    m = METHODS[method]
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in tensors]
    sh = {p.name: p.default for p in m.params if p.scope == "shared"}
    sh.update(shared or {})
    per_input: list[dict[str, Any]] = []
    for i in range(len(xs)):
        d = {
            p.name: p.default
            for p in m.params
            if p.scope == "input" or (p.scope == "non_base" and i != base)
        }
        d.update((per or [{}] * len(xs))[i])
        per_input.append(d)
    inp = TensorInputs(name, xs, [("m", i) for i in range(len(xs))], base, sh, per_input, seed)
    with torch.no_grad():
        return KERNELS[m.name](inp)


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Kernels on hand-computed examples


def test_linear():
    # (1*[1,2,3] + 3*[3,0,-3]) = [10, 2, -6]; normalized by 1 + 3 = 4.
    close(
        run("linear", [[1, 2, 3], [3, 0, -3]], per=[{"weight": 1.0}, {"weight": 3.0}]),
        [2.5, 0.5, -1.5],
    )
    close(
        run(
            "linear",
            [[1, 2, 3], [3, 0, -3]],
            per=[{"weight": 1.0}, {"weight": 3.0}],
            shared={"normalize": False},
        ),
        [10, 2, -6],
    )


def test_slerp():
    # Orthogonal unit vectors, t = 0.5: the 45-degree point.
    close(run("slerp", [[1, 0], [0, 1]], base=0, shared={"t": 0.5}), [S2, S2])
    # |v| = 2, theta = pi/2, t = 1/3: c0 = sin(pi/3) = 0.866025, c1 = sin(pi/6) = 0.5.
    close(run("slerp", [[2, 0], [0, 2]], base=0, shared={"t": 1 / 3}), [1.7320508, 1.0])
    # t = 0 is the base, wherever the base sits among the inputs; t = 1 is the other model.
    close(run("slerp", [[0, 3], [5, 0]], base=1, shared={"t": 0.0}), [5, 0])
    close(run("slerp", [[0, 3], [5, 0]], base=1, shared={"t": 1.0}), [0, 3])
    # Collinear (cos = 1 > 0.9995): plain lerp, 0.75*[1,2] + 0.25*[2,4] = [1.25, 2.5].
    close(run("slerp", [[1, 2], [2, 4]], base=0, shared={"t": 0.25}), [1.25, 2.5])


BASE4 = [1.0, 1.0, 1.0, 1.0]
M1 = [2.0, 1.0, 0.0, 1.0]  # delta [1, 0, -1, 0]
M2 = [1.0, 3.0, 1.0, -1.0]  # delta [0, 2, 0, -2]


def test_task_arithmetic():
    per = [{}, {"weight": 0.5}, {"weight": 1.0}]
    # mixed = 0.5*[1,0,-1,0] + [0,2,0,-2] = [0.5, 2, -0.5, -2]; + base.
    close(run("task_arithmetic", [BASE4, M1, M2], base=0, per=per), [1.5, 3.0, 0.5, -1.0])
    # normalize: mixed / 1.5 = [1/3, 4/3, -1/3, -4/3].
    close(
        run("task_arithmetic", [BASE4, M1, M2], base=0, per=per, shared={"normalize": True}),
        [4 / 3, 7 / 3, 2 / 3, -1 / 3],
    )
    # lambda 2: base + 2 * mixed.
    close(
        run("task_arithmetic", [BASE4, M1, M2], base=0, per=per, shared={"lambda": 2.0}),
        [2.0, 5.0, 0.0, -3.0],
    )
    # The base may sit anywhere among the inputs.
    close(
        run("task_arithmetic", [M1, BASE4, M2], base=1, per=[{"weight": 0.5}, {}, {"weight": 1.0}]),
        [1.5, 3.0, 0.5, -1.0],
    )


# TIES example. base = 1; d1 = [3, -1, 2, -4, 0.5, 1], d2 = [-2, 2, 1, -1, 3, -0.5], density 0.5 (k = 3).
#   top-3 |d1|: 4, 3, 2 -> s1 = [3, 0, 2, -4, 0, 0];  top-3 |d2|: 3, 2, 2 -> s2 = [-2, 2, 0, 0, 3, 0]
#   weights 0.5, 1: w*s1 = [1.5, 0, 1, -2, 0, 0], w*s2 = [-2, 2, 0, 0, 3, 0]
#   sum = [-0.5, 2, 1, -2, 3, 0] -> elected sign [-, +, +, -, +, + (0 counts as +)]
#   agreeing: s1 at 2, 3; s2 at 0, 1, 4
#   mixed = [-2, 2, 1, -2, 3, 0], divisor = [1, 1, 0.5, 0.5, 1, 0 -> 1]
TIES_D1 = [3.0, -1.0, 2.0, -4.0, 0.5, 1.0]
TIES_D2 = [-2.0, 2.0, 1.0, -1.0, 3.0, -0.5]


def _plus1(d: list[float]) -> list[float]:
    return [1.0 + x for x in d]


def test_ties():
    xs = [[1.0] * 6, _plus1(TIES_D1), _plus1(TIES_D2)]
    per = [{}, {"weight": 0.5, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    close(
        run("ties", xs, base=0, per=per), _plus1([-2, 2, 2, -4, 3, 0])
    )  # normalize is on by default
    close(
        run("ties", xs, base=0, per=per, shared={"normalize": False}), _plus1([-2, 2, 1, -2, 3, 0])
    )
    # density 1 keeps everything: sum = [-0.5, 2, 2, -3, 3.25, 0]; agree: idx0 d2; 1 d2; 2 both; 3 both; 4 both; 5 d1
    full = [{}, {"weight": 0.5}, {"weight": 1.0}]
    close(
        run("ties", xs, base=0, per=full, shared={"normalize": False}),
        _plus1([-2, 2, 2, -3, 3.25, 0.5]),
    )


def test_ties_sign_sum_zero_elects_plus():
    # w*d = [+1] and [-1]: the sum is exactly 0, the elected sign is +, so only the first takes part.
    close(
        run("ties", [[0.0], [1.0], [-1.0]], base=0, per=[{}, {"weight": 1.0}, {"weight": 1.0}]),
        [1.0],
    )


def _top_k_by_counting(d: torch.Tensor, k: int) -> torch.Tensor:
    """Expected TIES keep mask for integer-valued d, worked out by counting magnitudes: the k-th
    largest |d| is the largest t with #{|d| >= t} >= k; keep |d| > t, then the first ties in index order."""
    mags = d.abs().long()
    counts = torch.bincount(mags)
    above = 0
    for t in range(len(counts) - 1, -1, -1):
        if above + int(counts[t]) >= k:
            break
        above += int(counts[t])
    keep = mags > t
    tied = torch.nonzero(mags == t).reshape(-1)[: k - above]
    keep[tied] = True
    assert int(keep.sum()) == k
    return keep


@pytest.mark.parametrize("density", [0.05, 0.37, 0.9])
def test_ties_exact_top_k_on_a_large_tensor_with_ties(density):
    # 300001 entries (large enough for the sampled threshold bracket and many chunks), integer deltas
    # in [-20, 20]: thousands of entries tie at the threshold; exactly k = int(density * n) are kept.
    g = torch.Generator().manual_seed(7)
    n = 300_001
    d = torch.randint(-20, 21, (n,), generator=g).float()
    base = torch.randn(n, generator=g).round()
    out = run("ties", [base, base + d], base=0, per=[{}, {"weight": 1.0, "density": density}])
    keep = _top_k_by_counting(d, int(density * n))
    assert torch.equal(out - base, torch.where(keep, d, 0.0))


@pytest.mark.parametrize("bracket", [(0.0, 0.5), (19.5, 20.0), (7.0, 7.0)])
def test_ties_threshold_exact_when_the_sampled_bracket_misses(monkeypatch, bracket):
    from evomerge.engine.kernels import chunked as fused

    g = torch.Generator().manual_seed(8)
    n = 300_001
    d = torch.randint(-20, 21, (n,), generator=g).float()
    monkeypatch.setattr(fused, "_sample_bracket", lambda *a: bracket)
    out = run("ties", [torch.zeros(n), d], base=0, per=[{}, {"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, torch.where(_top_k_by_counting(d, n // 2), d, 0.0))


def test_breadcrumbs():
    # n = 10, density 0.5, gamma 0.1: keep 5, drop the top 1 and the bottom 10 - 5 - 1 = 4 by |d|.
    # |d| ranks 1..10 -> kept |d| in {5, 6, 7, 8, 9}.
    d = [-3.0, 10.0, 1.0, -7.0, 5.0, 2.0, -9.0, 4.0, 8.0, -6.0]
    kept = [0, 0, 0, -7, 5, 0, -9, 0, 8, -6]
    out = run(
        "breadcrumbs",
        [[0.0] * 10, d],
        base=0,
        per=[{}, {"weight": 1.0, "density": 0.5, "gamma": 0.1}],
    )
    close(out, kept)
    # breadcrumbs_ties with a second model d2 = 0.1*[1..10] (kept: 0.5..0.9 at positions 4..8):
    # sum = [0,0,0,-7,5.5,0.6,-8.3,0.8,8.9,-6]; at 6 the elected sign is -, so d2's 0.7 drops out.
    d2 = [0.1 * (i + 1) for i in range(10)]
    per = [
        {},
        {"weight": 1.0, "density": 0.5, "gamma": 0.1},
        {"weight": 1.0, "density": 0.5, "gamma": 0.1},
    ]
    close(
        run("breadcrumbs_ties", [[0.0] * 10, d, d2], base=0, per=per),
        [0, 0, 0, -7, 5.5, 0.6, -9, 0.8, 8.9, -6],
    )
    # normalized: divisor 2 where both agree (positions 4 and 8).
    close(
        run("breadcrumbs_ties", [[0.0] * 10, d, d2], base=0, per=per, shared={"normalize": True}),
        [0, 0, 0, -7, 2.75, 0.6, -9, 0.8, 4.45, -6],
    )


def test_dare_keeps_density_and_l1():
    torch.manual_seed(0)
    base = torch.zeros(200_000)
    delta = torch.randn(200_000)
    out = run("dare_linear", [base, delta], base=0, per=[{}, {"weight": 1.0, "density": 0.3}])
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    # Rescaled so the kept entries carry the original L1 norm, all by one common factor.
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
    factor = out[kept] / delta[kept]
    assert torch.allclose(factor, factor[0].expand_as(factor))
    assert factor[0].item() == pytest.approx(
        delta.abs().sum().item() / delta[kept].abs().sum().item(), rel=1e-4
    )
    # Without rescale the kept entries are the delta itself.
    raw = run(
        "dare_linear",
        [base, delta],
        base=0,
        per=[{}, {"weight": 1.0, "density": 0.3}],
        shared={"rescale": False},
    )
    assert torch.equal(raw[raw != 0], delta[raw != 0])


def test_dare_seed_and_name_fix_the_mask():
    base, d = torch.zeros(10_000), torch.randn(10_000)
    per = [{}, {"weight": 1.0, "density": 0.5}]
    a = run("dare_ties", [base, d], base=0, per=per, seed=1, name="x.weight")
    assert torch.equal(a, run("dare_ties", [base, d], base=0, per=per, seed=1, name="x.weight"))
    assert not torch.equal(
        a != 0, run("dare_ties", [base, d], base=0, per=per, seed=2, name="x.weight") != 0
    )
    assert not torch.equal(
        a != 0, run("dare_ties", [base, d], base=0, per=per, seed=1, name="y.weight") != 0
    )


def test_della_keep_probability_follows_rank():
    # Rows of 4: keep probabilities by |x| rank are density - eps + rank/3 * 2 eps = [0.2, 0.4, 0.6, 0.8].
    torch.manual_seed(0)
    rows = 40_000
    mags = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(rows, 1)
    perm = torch.argsort(torch.rand(rows, 4), dim=1)
    delta = torch.gather(mags, 1, perm) * torch.where(torch.rand(rows, 4) < 0.5, -1.0, 1.0)
    out = run(
        "della_linear",
        [torch.zeros(rows, 4), delta],
        base=0,
        per=[{}, {"weight": 1.0, "density": 0.5, "epsilon": 0.3}],
        shared={"rescale": False},
    )
    for mag, p in zip((1.0, 2.0, 3.0, 4.0), (0.2, 0.4, 0.6, 0.8), strict=False):
        where = delta.abs() == mag
        assert abs((out[where] != 0).float().mean().item() - p) < 0.015
    assert torch.equal(out[out != 0], delta[out != 0])
    with pytest.raises(ValueError, match="epsilon"):
        run(
            "della",
            [torch.zeros(2, 4), delta[:2]],
            base=0,
            per=[{}, {"weight": 1.0, "density": 0.9, "epsilon": 0.15}],
        )


def test_model_stock():
    # Offsets [1,0] and [1,1]: cos = 1/sqrt(2); t = 2c / (1 + c) = 0.828427; average = [1, 0.5].
    t = 2 * S2 / (1 + S2)
    close(run("model_stock", [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], base=0), [t * 1.0, t * 0.5])
    # Orthogonal offsets: cos = 0 -> t = 0 -> the base.
    close(run("model_stock", [[2.0, 2.0], [3.0, 2.0], [2.0, 3.0]], base=0), [2.0, 2.0])


def test_nuslerp():
    # t = w1 / (w0 + w1) = 0.75 between [1,0] and [0,1]: angle 67.5 degrees.
    c, s = math.cos(math.radians(67.5)), math.sin(math.radians(67.5))
    close(run("nuslerp", [[1.0, 0.0], [0.0, 1.0]], per=[{"weight": 1.0}, {"weight": 3.0}]), [c, s])
    # With a base the task vectors [1,0], [0,1] are interpolated and added back.
    close(
        run(
            "nuslerp",
            [[1.0, 1.0], [2.0, 1.0], [1.0, 2.0]],
            base=0,
            per=[{}, {"weight": 1.0}, {"weight": 3.0}],
        ),
        [1 + c, 1 + s],
    )


@pytest.mark.parametrize(
    ("row_wise", "flatten", "expected"),
    [
        # The whole tensor as one vector: v0 = [1,0,0,1], v1 = [0,1,0,1], cos = 1/2, angle 60
        # degrees; at t = 1/2 both coefficients are sin(30)/sin(60) = 1/sqrt(3): (v0 + v1)/sqrt(3).
        (False, True, [[1 / 3**0.5, 1 / 3**0.5], [0.0, 2 / 3**0.5]]),
        (True, True, [[1 / 3**0.5, 1 / 3**0.5], [0.0, 2 / 3**0.5]]),  # flatten wins
        # Rows of the last axis: [1,0] -> [0,1] at 90 degrees gives [S2, S2]; [0,1] -> [0,1] is
        # colinear and lerps to [0,1].
        (False, False, [[S2, S2], [0.0, 1.0]]),
        # Vectors along the first axis, one per position of the others: at the first position
        # [1,0] -> [0,0] (a zero vector has no direction: cos 0, angle 90) gives sin(45)*[1,0] =
        # [S2, 0]; at the second [0,1] -> [1,1] (45 degrees) gives (sin(22.5)/sin(45))*[1,2].
        (True, False, [[S2, 0.5412], [0.0, 1.0824]]),
    ],
)
def test_nuslerp_splits_a_4d_tensor_into_vectors(row_wise, flatten, expected):
    # A 2x1x1x2 tensor (a conv kernel's shape): v0[:, 0, 0, :] = [[1,0],[0,1]], v1's = [[0,1],[0,1]].
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    v1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    out = run(
        "nuslerp",
        [v0, v1],
        shared={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten},
        per=[{"weight": 1.0}, {"weight": 1.0}],
    )
    assert out.shape == (2, 1, 1, 2)
    close(out.reshape(2, 2), expected, tol=1e-4)


def test_multislerp_and_karcher():
    # Equal weights on orthogonal unit vectors: the midpoint direction, scaled by the mean norm 1.
    close(
        run("multislerp", [[1.0, 0.0], [0.0, 1.0]], per=[{"weight": 1.0}, {"weight": 1.0}]),
        [S2, S2],
    )
    # Karcher mean of [1,0] and [0,2]: direction 45 degrees, norm (1 + 2) / 2 = 1.5.
    close(run("karcher", [[1.0, 0.0], [0.0, 2.0]]), [1.5 * S2, 1.5 * S2])


def test_sce():
    # tvs d1 = [1,-2,3], d2 = [3,2,-1]; energies 14/3 each -> weights 0.5, 0.5.
    # sign of sum [4, 0, 2] -> all +; d1 kept at 0, 2; d2 at 0, 1.
    # out = [(0.5*1 + 0.5*3)/1, (0.5*2)/0.5, (0.5*3)/0.5] = [2, 2, 3].
    close(
        run("sce", [[0.0, 0.0, 0.0], [1.0, -2.0, 3.0], [3.0, 2.0, -1.0]], base=0), [2.0, 2.0, 3.0]
    )


def test_passthrough_scale():
    close(run("passthrough", [[1.0, -2.0]], per=[{"scale": 2.5}]), [2.5, -5.0])
    close(run("passthrough", [[1.0, -2.0]]), [1.0, -2.0])


# ---------------------------------------------------------------------------------------------
# Parameter resolution


def test_gradient_and_filters():
    t = METHODS["slerp"].param("t")
    assert t is not None
    # [0, 0.5, 0.3, 0.7, 1] at t = 1/3 sits at 4/3: 0.5 + (1/3)(0.3 - 0.5) = 0.43333.
    assert evaluate_setting((0.0, 0.5, 0.3, 0.7, 1.0), "x", 1 / 3, t) == pytest.approx(
        0.433333, abs=1e-6
    )
    assert evaluate_setting((0.0, 0.5, 0.3, 0.7, 1.0), "x", 2 / 3, t) == pytest.approx(
        0.566667, abs=1e-6
    )
    from evomerge.recipe.schema import Cond

    conds = (Cond(0.1, "mlp"), Cond(0.9, "mlp.up"), Cond(0.5, None))
    assert (
        evaluate_setting(conds, "model.layers.0.mlp.up_proj.weight", 0.0, t) == 0.1
    )  # first match wins
    assert evaluate_setting(conds, "model.layers.0.self_attn.q_proj.weight", 0.0, t) == 0.5
    assert evaluate_setting((Cond(0.1, "mlp"),), "model.norm.weight", 0.0, t) is None


def test_plan_gradients_per_layer(tiny_family):
    base, (ft1, *_) = tiny_family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(base),
        "slices": [
            {
                "sources": [
                    {"model": str(base), "layer_range": [0, 4]},
                    {"model": str(ft1), "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": [0.2, 1.0]},
            ]
        },
    }
    cfg = load_recipe(recipe)
    plan = make_plan(cfg, open_sources(cfg.referenced_models()))
    t = {task.out_name: task.shared["t"] for task in plan.tasks}
    # 4 layers: layer i at t = i/3.
    for i, want in enumerate((0.0, 0.433333, 0.566667, 1.0)):
        assert t[f"model.layers.{i}.self_attn.q_proj.weight"] == pytest.approx(want, abs=1e-6)
        assert t[f"model.layers.{i}.mlp.up_proj.weight"] == pytest.approx(1 - want, abs=1e-6)
        assert t[f"model.layers.{i}.input_layernorm.weight"] == pytest.approx(
            0.2 + 0.8 * i / 3, abs=1e-6
        )
    # Outside the layers t = 0: the gradient's first value.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert t[name] == pytest.approx(0.2)


def test_precedence_source_over_slice_over_global(tiny_family):
    base, (ft1, ft2, _) = tiny_family
    recipe = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {
                        "model": str(ft1),
                        "layer_range": [0, 4],
                        "parameters": {"weight": [{"filter": "mlp", "value": 0.7}]},
                    },
                    {"model": str(ft2), "layer_range": [0, 4]},
                ],
                "parameters": {"weight": [{"filter": "self_attn", "value": 0.3}]},
            }
        ],
        "parameters": {"weight": 0.1},
    }
    cfg = load_recipe(recipe)
    plan = make_plan(cfg, open_sources(cfg.referenced_models()))
    w = {task.out_name: [p["weight"] for p in task.per_input] for task in plan.tasks}
    assert w["model.layers.1.mlp.up_proj.weight"] == [
        0.7,
        0.1,
    ]  # ft1: source; ft2: no slice match -> global
    assert w["model.layers.1.self_attn.q_proj.weight"] == [
        0.3,
        0.3,
    ]  # source filter misses -> slice
    assert w["model.norm.weight"] == [0.1, 0.1]  # global


# ---------------------------------------------------------------------------------------------
# Whole merges on tiny models


def _recipe(method: str, base: Path, models: list[Path], **params: Any) -> dict[str, Any]:
    per = {k: v for k, v in params.items() if k in ("weight", "density")}
    glob = {k: v for k, v in params.items() if k not in per}
    r: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(base)}]
        + [{"model": str(m), "parameters": dict(per)} for m in models],
    }
    if glob:
        r["parameters"] = glob
    return r


def test_dare_determinism_across_runs_and_order(tiny_family):
    base, models = tiny_family
    cfg = load_recipe(_recipe("dare_ties", base, models, weight=0.5, density=0.4))
    sources = open_sources(cfg.referenced_models())
    m = Merger(sources, seed=7)
    plan = m.plan(cfg)
    r1 = m.execute(plan, lambda n, t: None)
    plan.tasks.reverse()
    r2 = Merger(sources, seed=7).execute(plan, lambda n, t: None)
    assert r1.per_tensor == r2.per_tensor and r1.digest == r2.digest
    r3 = Merger(sources, seed=8).execute(plan, lambda n, t: None)
    assert r3.digest != r1.digest


def test_in_memory_equals_disk(tiny_family, tmp_path):
    base, models = tiny_family
    for method, params in (
        ("ties", {"weight": 0.5, "density": 0.5}),
        ("dare_linear", {"weight": 0.3, "density": 0.6}),
    ):
        cfg = load_recipe(_recipe(method, base, models, **params))
        res = merge_to_disk(cfg, tmp_path / method, seed=3)
        merger = Merger(
            open_sources(cfg.referenced_models()), seed=3, resident=True, cache_bytes=1 << 26
        )
        plan = merger.plan(cfg)
        model = merger.build_model(plan)
        first = merger.merge_into(model, plan)
        again = merger.merge_into(
            model, plan
        )  # cached task vectors / thresholds / masks give the same tensors
        assert first.digest == again.digest == res.digest == digest_model_dir(tmp_path / method)
        saved = load_file(tmp_path / method / "model.safetensors")
        state = model.state_dict()
        for name, t in saved.items():
            assert torch.equal(state[name], t), name


def test_resident_ties_across_densities_equals_disk(tiny_family, tmp_path):
    # The search re-merges with a new density each trial. From the second density on, the resident
    # merger reads thresholds off a cached stable order of |delta|; the tensors must still be the
    # ones a fresh disk merge writes.
    base, models = tiny_family
    merger = Merger(
        open_sources([str(base), *map(str, models)]), seed=0, resident=True, cache_bytes=1 << 26
    )
    model = None
    for density in (0.5, 0.3, 0.7, 0.5):
        cfg = load_recipe(_recipe("ties", base, models, weight=0.5, density=density))
        plan = merger.plan(cfg)
        model = model or merger.build_model(plan)
        got = merger.merge_into(model, plan)
        assert got.digest == merge_to_disk(cfg, tmp_path / f"d{density}", force=True).digest, (
            density
        )
    assert any(k[0] == "order" for k in merger.cache._items)


def test_rule_from_order_matches_counting():
    from evomerge.engine.kernels.chunked import rule_from_order

    g = torch.Generator().manual_seed(9)
    n = 50_000
    d = torch.randint(-6, 7, (n,), generator=g).float()
    inp = TensorInputs("t", [torch.zeros(n), d], [0, 1], 0, {}, [{}, {}])
    order = torch.sort(d.abs(), descending=True, stable=True).indices.to(torch.int32)
    for k in (1, 777, n // 2, n - 1):
        rule = rule_from_order(inp, 1, k, order)
        assert isinstance(rule, KeepAbove)
        kept = d.abs() > rule.threshold
        if rule.extra is not None:
            kept[rule.extra] = True
        assert torch.equal(kept, _top_k_by_counting(d, k)), k


def test_nan_is_an_error_naming_the_tensor(tiny_family, tmp_path):
    base, (ft1, *_) = tiny_family
    bad = tmp_path / "bad"
    perturbed(base, bad, seed=9)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(ft1), "parameters": {"weight": 1}},
            {"model": str(bad), "parameters": {"weight": 1}},
        ],
    }
    with pytest.raises(
        EvomergeError, match=r"model\.layers\.2\.mlp\.down_proj\.weight.*NaN or inf"
    ):
        merge_to_disk(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Overflow to inf is caught the same way.
    huge = {
        "merge_method": "linear",
        "models": [
            {"model": str(ft1), "parameters": {"weight": 3e38}},
            {"model": str(base), "parameters": {"weight": 3e38}},
        ],
        "parameters": {"normalize": False},
    }
    with pytest.raises(EvomergeError, match="NaN or inf"):
        merge_to_disk(huge, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma", "phi3"])
def test_architectures_linear_average(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    # phi3's default special-token ids (32000) lie outside the tiny vocabulary.
    extra = {"pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0} if arch == "phi3" else {}
    a = make_tiny(tmp_path / "a", seed=1, arch=arch, **extra)
    b = perturbed(a, tmp_path / "b", seed=2)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": 1}},
            {"model": str(b), "parameters": {"weight": 3}},
        ],
    }
    merge_to_disk(recipe, tmp_path / "out")
    sa, sb, so = (load_file(p / "model.safetensors") for p in (a, b, tmp_path / "out"))
    assert set(so) == set(sa)
    for name in sa:
        torch.testing.assert_close(so[name], (sa[name] + 3 * sb[name]) / 4, atol=1e-6, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.model_type == json.loads((a / "config.json").read_text())["model_type"]
    plan = make_plan(load_recipe(recipe), open_sources([str(a), str(b)]))
    assert plan.num_layers == 4  # the layer stack was found (transformer.h.N for gpt2)


def test_passthrough_stacks_layers(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, (ft1, *_) = tiny_family
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(ft1), "layer_range": [2, 4], "parameters": {"scale": 0.5}}]},
        ],
    }
    merge_to_disk(recipe, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    out, sb, sf = (load_file(p / "model.safetensors") for p in (tmp_path / "out", base, ft1))
    assert torch.equal(
        out["model.layers.1.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        out["model.layers.5.mlp.up_proj.weight"], sf["model.layers.3.mlp.up_proj.weight"] * 0.5
    )
    assert torch.equal(
        out["model.layers.4.self_attn.q_proj.weight"],
        sf["model.layers.2.self_attn.q_proj.weight"] * 0.5,
    )
    # Tensors after the layers come from the last slice's model (scaled too).
    assert torch.equal(out["lm_head.weight"], sf["lm_head.weight"] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], sb["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6


def test_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    untied = make_tiny(tmp_path / "u", seed=1)
    tied = make_tiny(tmp_path / "t", seed=2, tie_word_embeddings=True)
    su, st = load_file(untied / "model.safetensors"), load_file(tied / "model.safetensors")
    assert "lm_head.weight" not in st
    # Untied reference: the tied model's head is its embedding matrix.
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(untied), "parameters": {"weight": 1}},
            {"model": str(tied), "parameters": {"weight": 1}},
        ],
    }
    merge_to_disk(recipe, tmp_path / "out", allow_crimes=True)
    so = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(
        so["lm_head.weight"],
        (su["lm_head.weight"] + st["model.embed_tokens.weight"]) / 2,
        atol=1e-6,
        rtol=0,
    )
    # Tied reference: no lm_head is written and the output stays tied.
    tied2 = perturbed(tied, tmp_path / "t2", seed=3)
    recipe2 = {
        "merge_method": "linear",
        "models": [
            {"model": str(tied), "parameters": {"weight": 1}},
            {"model": str(tied2), "parameters": {"weight": 1}},
        ],
    }
    merge_to_disk(recipe2, tmp_path / "out2")
    assert "lm_head.weight" not in load_file(tmp_path / "out2" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out2")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

"""Compiled task-vector kernels (resident re-merges on CPU) against the chunked kernels, bit for bit.

The search scores tensors made by the compiled kernels; ``evomerge merge`` re-merges an exported
recipe with the chunked ones. Both must write the same bits, or an exported recipe would not
reproduce what was scored.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch

from evomerge.engine import METHODS
from evomerge.engine.inputs import PrepCache, TensorInputs
from evomerge.engine.kernels import compiled
from evomerge.engine.kernels.methods import KERNELS

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _small_tensors_compile(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)
    monkeypatch.delenv("EVOMERGE_COMPILE", raising=False)
    compiled.reset()
    yield
    compiled.reset()


# torch.compile on CPU needs a C++ compiler; without one evomerge falls back (tested below).
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")),
    reason="no C++ compiler: torch.compile cannot build CPU kernels here",
)


def _inputs(n: int, dtype: torch.dtype, seed: int = 0, k: int = 3) -> list[torch.Tensor]:
    """A base and ``k`` fine-tunes with the awkward cases: deltas that tie at any threshold
    (small integers), entries equal to the base, and a base holding +0 and -0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    base[:64] = 0.0
    base[64:128] = -0.0
    xs = [base]
    for j in range(k):
        d = (
            torch.randint(-4, 5, (n,), generator=g).float() * 0.125
            if j == 0
            else 0.05 * torch.randn(n, generator=g)
        )
        d[: 32 * (j + 1)] = 0.0
        xs.append(base + d)
    return [x.to(dtype) for x in xs]


def _run(
    method: str,
    xs: list[torch.Tensor],
    per: dict[str, Any],
    shared: dict[str, Any],
    *,
    use_compiled: bool,
    out_dtype: torch.dtype,
    cache: PrepCache | None = None,
) -> tuple[torch.Tensor, bool | None]:
    m = METHODS[method]
    sh = {p.name: p.default for p in m.params if p.scope == "shared"}
    sh.update(shared)
    per_input = []
    for i in range(len(xs)):
        d = {
            p.name: p.default
            for p in m.params
            if p.scope == "input" or (p.scope == "non_base" and i != 0)
        }
        d.update({k: v[i - 1] if isinstance(v, list) else v for k, v in per.items()} if i else {})
        per_input.append(d)
    inp = TensorInputs(
        "model.layers.0.mlp.up_proj.weight",
        xs,
        [("m", i) for i in range(len(xs))],
        0,
        sh,
        per_input,
        5,
        cache,
        out_dtype=out_dtype,
        compiled=use_compiled,
    )
    with torch.no_grad():
        out = KERNELS[m.name](inp)
    return out, inp.finite


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


CASES = [
    ("ties", {"weight": [0.5, 0.3, 0.9], "density": [0.5, 0.37, 0.8]}, {}),
    (
        "ties",
        {"weight": [1.0, -0.4, 0.7], "density": [1.0, 0.2, 0.6]},
        {"normalize": False, "lambda": 0.8},
    ),
    ("dare_ties", {"weight": [0.5, 0.3, 0.9], "density": [0.5, 0.37, 1.0]}, {}),
    ("dare_linear", {"weight": [0.5, 0.3, 0.9], "density": [0.3, 0.6, 0.9]}, {"lambda": 1.3}),
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.9]}, {"normalize": True}),
]


@pytest.mark.parametrize(
    "method,per,shared", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
@needs_compiler
def test_compiled_equals_chunked_bit_for_bit(method, per, shared):
    xs = _inputs(200_003, torch.float32)
    want, want_finite = _run(method, xs, per, shared, use_compiled=False, out_dtype=torch.bfloat16)
    got, got_finite = _run(method, xs, per, shared, use_compiled=True, out_dtype=torch.bfloat16)
    assert compiled._FAILED is None, compiled._FAILED
    assert "combine" in compiled._COMPILED  # the compiled path ran, not the fallback
    assert want_finite is got_finite is True
    assert torch.equal(_bits(got), _bits(want))


@needs_compiler
def test_compiled_ties_reads_cached_order_and_bf16_sources():
    # bf16 sources tie at the threshold often; thresholds come from the cached stable order
    # (a radix sort of the float bits) from the second density on, as in a search.
    xs = _inputs(150_001, torch.bfloat16, seed=3)
    xs = [x.float() for x in xs]  # resident tensors are in the compute dtype
    cache = PrepCache(1 << 28)
    for density in (0.5, 0.23, 0.61):
        per = {"weight": [0.4, 0.7, 0.2], "density": density}
        want, _ = _run("ties", xs, per, {}, use_compiled=False, out_dtype=torch.float32)
        got, _ = _run("ties", xs, per, {}, use_compiled=True, out_dtype=torch.float32, cache=cache)
        assert torch.equal(_bits(got), _bits(want)), density
    assert any(key[0] == "order" for key in cache._items)


@needs_compiler
def test_non_finite_output_is_reported():
    xs = _inputs(4096, torch.float32)
    xs[2][7] = float("inf")
    _, finite = _run(
        "ties", xs, {"weight": 1.0, "density": 1.0}, {}, use_compiled=True, out_dtype=torch.float32
    )
    assert finite is False


def test_compile_failure_warns_once_and_falls_back(monkeypatch, capsys):
    def broken(name: str) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("no C++ compiler found")

        return fn

    monkeypatch.setattr(compiled, "_compiled", broken)
    xs = _inputs(10_000, torch.float32)
    per = {"weight": [0.5, 0.3, 0.9], "density": 0.5}
    want, _ = _run("ties", xs, per, {}, use_compiled=False, out_dtype=torch.float32)
    for _ in range(2):
        got, finite = _run("ties", xs, per, {}, use_compiled=True, out_dtype=torch.float32)
        assert finite and torch.equal(got, want)
    err = capsys.readouterr().err
    assert err.count("torch.compile is unavailable (RuntimeError: no C++ compiler found)") == 1
    assert not compiled.available()


@needs_compiler
def test_resident_search_merges_equal_disk_merges(tiny_family, tmp_path):
    # The search's path end to end: a resident merger (compiled kernels on by default on CPU)
    # re-merging with new densities and weights, against fresh `evomerge merge` runs to disk.
    from evomerge.engine import Merger, merge_to_disk, open_sources
    from evomerge.recipe.schema import load_recipe

    base, models = tiny_family
    merger = Merger(
        open_sources([str(base), *map(str, models)]), seed=4, resident=True, cache_bytes=1 << 26
    )
    assert merger.compile
    model = None
    for method, density, weights in (
        ("ties", 0.5, (0.5, 0.3, 0.9)),
        ("ties", 0.3, (1.0, 0.2, 0.4)),
        ("dare_ties", 0.6, (0.5, 0.5, 0.5)),
        ("dare_linear", 0.4, (0.2, 0.7, 0.3)),
    ):
        cfg = load_recipe(
            {
                "merge_method": method,
                "base_model": str(base),
                "models": [{"model": str(base)}]
                + [
                    {"model": str(m), "parameters": {"weight": w, "density": density}}
                    for m, w in zip(models, weights, strict=False)
                ],
                "dtype": "float32",
                "out_dtype": "bfloat16",
            }
        )
        plan = merger.plan(cfg)
        model = model or merger.build_model(plan)
        got = merger.merge_into(model, plan)
        want = merge_to_disk(cfg, tmp_path / f"{method}-{density}", seed=4)
        assert got.digest == want.digest, (method, density)
    assert compiled._FAILED is None and "combine" in compiled._COMPILED

"""nearswap, arcee_fusion, ram and ramplus_tl (mergekit 0.1.5's newer methods), and parameters a
method does not use (mergekit ignores them; evomerge warns once and merges).

Kernel tests compare with numbers worked out on paper (the working is in the comments); model-level
tests use the tiny models of ``tests/_tiny.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _tiny import make_tiny
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.engine import METHODS, make_plan, merge_to_disk, open_sources
from evomerge.engine.inputs import TensorInputs
from evomerge.engine.kernels.extra import _quartiles
from evomerge.engine.kernels.methods import KERNELS
from evomerge.errors import ConfigError
from evomerge.recipe.schema import load_recipe, parse_recipe
from evomerge.space import parse_space


def run(
    method: str,
    tensors: list[Any],
    *,
    base: int,
    shared: dict[str, Any] | None = None,
    decision_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One method's kernel on small tensors, its defaults for the shared parameters not given."""
    m = METHODS[method]
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in tensors]
    sh = {p.name: p.default for p in m.params if p.scope == "shared"}
    sh.update(shared or {})
    inp = TensorInputs(
        "t.weight",
        xs,
        [("m", i) for i in range(len(xs))],
        base,
        sh,
        [{} for _ in xs],
        decision_dtype=decision_dtype,
    )
    with torch.no_grad():
        return KERNELS[m.name](inp)


def close(actual: torch.Tensor, expected: list[Any], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------
# nearswap


def test_nearswap():
    # base a = 1 everywhere, other b = [1.05, 1.2, 0, 1], t = 0.1:
    # |a - b| = [0.05, 0.2, 1, 0] (0 floored at 1e-6); w = t / |a - b| clamped to [0, 1] = [1, 0.5, 0.1, 1];
    # w*b + (1-w)*a = [1.05, 0.5*1.2 + 0.5*1, 0.1*0 + 0.9*1, 1] = [1.05, 1.1, 0.9, 1].
    other, base = [1.05, 1.2, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]
    close(run("nearswap", [other, base], base=1, shared={"t": 0.1}), [1.05, 1.1, 0.9, 1.0])
    # t = 0: w = 0, the base; t >= the largest distance (1): w = 1, the other model.
    close(run("nearswap", [other, base], base=1, shared={"t": 0.0}), base)
    close(run("nearswap", [base, other], base=0, shared={"t": 1.0}), other)


# ---------------------------------------------------------------------------------------------
# arcee_fusion


def test_arcee_fusion_keeps_changes_above_median_plus_1_5_iqr():
    # 1-D: one softmax over the whole vector, so one KL divergence k > 0 scales every importance
    # and the mask depends on |delta| alone. |delta| sorted = [0, 0, 0, 0, 0, 1, 1.6, 9]: with
    # n = 8, q1 = sorted[int(0.25*7)] = sorted[1] = 0, median = sorted[3] = 0, q3 = sorted[5] = 1;
    # threshold = 0 + 1.5*(1 - 0) = 1.5: 1.6 and 9 are kept, the change of 1 reverts to the base.
    # (Interpolated quartiles would give q3 = 1 + 0.25*0.6 = 1.15, threshold 1.725, and drop 1.6.)
    base = [1.0] * 8
    delta = [0.0, -1.6, 0.0, 1.0, 0.0, 9.0, 0.0, 0.0]
    other = [b + d for b, d in zip(base, delta, strict=True)]
    close(run("arcee_fusion", [base, other], base=0), [1.0, -0.6, 1.0, 1.0, 1.0, 10.0, 1.0, 1.0])


def test_arcee_fusion_weighs_each_row_by_its_kl_divergence():
    # Row 0 of the other model is the base row shifted by 5: the same softmax, KL = 0, importance
    # 0 however large the change. Row 1 has KL k > 0 and importance |delta|*k = [0.1k, 0.2k,
    # 0.25k, 2k]. Sorted importances: [0, 0, 0, 0, 0.1k, 0.2k, 0.25k, 2k]; q1 = sorted[1] = 0,
    # median = sorted[3] = 0, q3 = sorted[5] = 0.2k; threshold = 1.5*0.2k = 0.3k: only 2.0 is kept.
    base = [[0.0] * 4, [0.0] * 4]
    other = [[5.0] * 4, [0.1, -0.2, 0.25, 2.0]]
    close(run("arcee_fusion", [base, other], base=0), [[0.0] * 4, [0.0, 0.0, 0.0, 2.0]])


def test_arcee_fusion_decides_its_mask_in_the_recipes_dtype():
    # As the first test, with the change 1.6 made 1.4990234375 (1.5 - 2^-10): |delta| sorted =
    # [0, 0, 0, 0, 0, 1, 1.499, 9], q1 = median = 0, q3 = k, threshold 1.5 k. In float32,
    # 1.499 k < 1.5 k: the change reverts. bfloat16 keeps 8 significant bits (steps of 2^-7 in
    # [1, 2)): the change rounds to 1.5, its importance is bf16(1.5 k), the threshold computed by
    # the same ops, and it is kept (mergekit keeps it in a bfloat16 recipe), with its float32 value.
    # float16 (steps of 2^-10) holds 1.499 exactly: below the threshold, as in float32.
    base = [0.0] * 8
    other = [0.0, 1.4990234375, 0.0, 1.0, 0.0, 9.0, 0.0, 0.0]
    reverted = [0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0]
    close(run("arcee_fusion", [base, other], base=0), reverted)
    close(run("arcee_fusion", [base, other], base=0, decision_dtype=torch.float16), reverted)
    kept = run("arcee_fusion", [base, other], base=0, decision_dtype=torch.bfloat16)
    assert kept.dtype == torch.float32
    close(kept, [0.0, 1.4990234375, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0], tol=0.0)


def test_plan_decides_in_the_recipes_dtype_else_the_stored_one(tmp_path):
    # mergekit computes in the recipe's dtype, else in the inputs' dtypes promoted
    # (bfloat16 with float16 promotes to float32).
    f32 = make_tiny(tmp_path / "f32", seed=0)
    bf16, bf16b = (make_tiny(tmp_path / f"bf16{s}", seed=s, dtype=torch.bfloat16) for s in (1, 2))
    f16, f16b = (make_tiny(tmp_path / f"f16{s}", seed=s, dtype=torch.float16) for s in (3, 4))

    def decided(models: list[Path], dtype: str | None) -> set[str]:
        recipe = {"merge_method": "arcee_fusion", "base_model": str(models[0])}
        recipe["models"] = [{"model": str(m)} for m in models]
        cfg = parse_recipe(recipe | ({"dtype": dtype} if dtype else {}))
        plan = make_plan(cfg, open_sources(cfg.referenced_models()))
        return {t.decision_dtype for t in plan.tasks}

    assert decided([f32, bf16], "bfloat16") == {"bfloat16"}
    assert decided([bf16, bf16b], None) == {"bfloat16"}
    assert decided([f32, bf16], None) == {"float32"}
    assert decided([f16, bf16], None) == {"float32"}
    assert decided([f16, f16b], None) == {"float16"}


def test_arcee_fusion_quartiles_are_exact_beyond_mergekits_sample_size():
    # mergekit estimates them from a random sample of 1M entries above 1M; here they are the
    # order statistics floor(q*(n-1)) of the whole tensor: n - 1 = 2,000,000 -> 500k, 1M, 1.5M.
    g = torch.Generator().manual_seed(0)
    scores = torch.randperm(2_000_001, generator=g).float()
    assert [float(v) for v in _quartiles(scores)] == [500_000.0, 1_000_000.0, 1_500_000.0]


# ---------------------------------------------------------------------------------------------
# ram and ramplus_tl

# base = 1; task vectors (|delta| <= epsilon = 1e-5 counts as unchanged):
#   m1: [1, 2,    0, 0,  3]
#   m2: [3, 1e-6, 0, 0, -1]   (the 1e-6 is below epsilon)
#   m3: [0, 0,    4, 0,  5]
# models changing each entry: [2 (m1, m2), 1 (m1), 1 (m3), 0, 3].
RAM_BASE = [1.0] * 5
RAM_MODELS = [[2.0, 3.0, 1.0, 1.0, 4.0], [4.0, 1.000001, 1.0, 1.0, 0.0], [1.0, 1.0, 5.0, 1.0, 6.0]]


def test_ram():
    # mean of the changes per entry: [(1+3)/2, 2, 4, 0, (3-1+5)/3] = [2, 2, 4, 0, 7/3]; + base.
    close(run("ram", [RAM_BASE, *RAM_MODELS], base=0), [3.0, 3.0, 5.0, 1.0, 1 + 7 / 3], tol=1e-5)
    # epsilon = 2.5 keeps only m1's 3, m2's 3 (entry 0), m3's 4 and 5:
    # [3, 0, 4, 0, (3+5)/2] + base = [4, 1, 5, 1, 5].
    close(
        run("ram", [*RAM_MODELS, RAM_BASE], base=3, shared={"epsilon": 2.5}),
        [4.0, 1.0, 5.0, 1.0, 5.0],
    )
    # The base alone is the base.
    close(run("ram", [RAM_BASE], base=0), RAM_BASE)


def test_ramplus_tl():
    # Per model, entries it changes together with others (shared) and alone (unique):
    #   m1: shared {0, 4}, unique {1} -> rho = 2/1 = 2;  m2: shared {0, 4}, unique {} -> rho = 2/1e-5;
    #   m3: shared {4}, unique {2} -> rho = 1.
    # r = 0.5, alpha = 1.5: boost = 1 + 0.5*min(rho, 1.5) = [1.75, 1.75, 1.5] on unique entries:
    # [(1+3)/2, 2*1.75, 4*1.5, 0, 7/3] + base = [3, 4.5, 7, 1, 1 + 7/3].
    got = run("ramplus_tl", [RAM_BASE, *RAM_MODELS], base=0, shared={"r": 0.5, "alpha": 1.5})
    close(got, [3.0, 4.5, 7.0, 1.0, 1 + 7 / 3], tol=1e-5)
    # Defaults r = 0.1, alpha = 0.2: every rho >= 0.2, boost 1.02: [2, 2.04, 4.08, 0, 7/3] + base.
    close(
        run("ramplus_tl", [RAM_BASE, *RAM_MODELS], base=0),
        [3.0, 3.04, 5.08, 1.0, 1 + 7 / 3],
        tol=1e-5,
    )
    # alpha = 0: no boost, the same as ram.
    same = run("ramplus_tl", [RAM_BASE, *RAM_MODELS], base=0, shared={"alpha": 0.0})
    torch.testing.assert_close(same, run("ram", [RAM_BASE, *RAM_MODELS], base=0))


# ---------------------------------------------------------------------------------------------
# Declarations: what a recipe must give


def _recipe(method: str, models: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": "b",
        "models": [{"model": m} for m in models],
        **extra,
    }


def test_declarations_follow_mergekit():
    assert [p.name for p in METHODS["ramplus_tl"].params] == ["r", "alpha", "epsilon"]
    load_recipe(_recipe("nearswap", ["b", "x"], parameters={"t": 0.001}))
    load_recipe(_recipe("arcee_fusion", ["b", "x"]))
    load_recipe(_recipe("ram", ["b", "x", "y", "z"]))
    with pytest.raises(ConfigError, match=r"parameters: merge_method nearswap needs `t`"):
        load_recipe(_recipe("nearswap", ["b", "x"]))
    with pytest.raises(
        ConfigError, match=r"models: merge_method arcee_fusion takes exactly 2 model\(s\), got 3"
    ):
        load_recipe(_recipe("arcee_fusion", ["b", "x", "y"]))
    with pytest.raises(ConfigError, match=r"merge_method ram needs a base_model"):
        load_recipe({"merge_method": "ram", "models": [{"model": "x"}, {"model": "y"}]})
    with pytest.raises(
        ConfigError, match=r"parameters.epsilon: must be a number in \(0, inf\), got 0"
    ):
        load_recipe(_recipe("ramplus_tl", ["b", "x"], parameters={"epsilon": 0}))


# ---------------------------------------------------------------------------------------------
# Whole models


def _merge(recipe: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    merge_to_disk(recipe, out, copy_tokenizer=False)
    return load_file(out / "model.safetensors")


def test_models_merge_with_the_expected_invariants(tiny_family, tmp_path):
    base, ft = tiny_family
    b, x = str(base), str(ft[0])
    sd_b, sd_x = load_file(base / "model.safetensors"), load_file(ft[0] / "model.safetensors")
    pair = {"base_model": b, "models": [{"model": b}, {"model": x}], "dtype": "float32"}
    # nearswap with t beyond every distance is the other model; with t = 0 the base.
    far = _merge({"merge_method": "nearswap", **pair, "parameters": {"t": 100.0}}, tmp_path / "far")
    near = _merge({"merge_method": "nearswap", **pair, "parameters": {"t": 0.0}}, tmp_path / "near")
    assert all(torch.equal(far[k], sd_x[k]) and torch.equal(near[k], sd_b[k]) for k in sd_b)
    # arcee_fusion takes each entry from one model or the other, and both somewhere.
    fused = _merge({"merge_method": "arcee_fusion", **pair}, tmp_path / "fusion")
    from_x = sum(int((fused[k] == sd_x[k]).sum()) for k in sd_b)
    from_b = sum(int((fused[k] == sd_b[k]).sum()) for k in sd_b)
    assert from_x + from_b == sum(v.numel() for v in sd_b.values()) and from_x and from_b
    # ram with one fine-tune: every change above epsilon is that model's alone, taken whole.
    ram = _merge({"merge_method": "ram", **pair}, tmp_path / "ram")
    assert all(torch.allclose(ram[k], sd_x[k], atol=2e-5, rtol=0) for k in sd_b)


# ---------------------------------------------------------------------------------------------
# The search space offers them


def test_space_can_choose_nearswap_and_renders_a_valid_recipe():
    space = parse_space(
        {
            "merge_method": {"choice": ["slerp", "nearswap", "arcee_fusion"]},
            "base_model": "/m/a",
            "models": [{"model": "/m/a"}, {"model": "/m/b"}],
            "parameters": {"t": {"range": [0.0, 0.5]}},
            "dtype": "float32",
        },
        "s.yml",
    )
    asked: list[str] = []

    def pick(method: str):
        def suggest(name, d):
            asked.append(name)
            return {"method": method, "t": 0.01}[name]

        return suggest

    r = space.render(pick("nearswap"), lambda ref: 4)
    assert r["merge_method"] == "nearswap" and r["parameters"] == {"t": 0.01}
    assert parse_recipe(r, "rendered").method.name == "nearswap"
    asked.clear()
    r = space.render(pick("arcee_fusion"), lambda ref: 4)
    # arcee_fusion takes no parameter: t is neither sampled nor written.
    assert asked == ["method"] and not r.get("parameters")
    parse_recipe(r, "rendered")


# ---------------------------------------------------------------------------------------------
# Parameters another method takes: ignored with one warning line, as mergekit ignores them


def _slerp(models: tuple[Path, Path], **params: Any) -> dict[str, Any]:
    b, x = str(models[0]), str(models[1])
    return {
        "merge_method": "slerp",
        "base_model": b,
        "models": [
            {"model": b, "parameters": dict(params)},
            {"model": x, "parameters": dict(params)},
        ],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    }


def test_a_parameter_the_method_does_not_use_is_ignored_with_one_warning(
    tiny_family, tmp_path, capsys
):
    base, ft = tiny_family
    plain = tmp_path / "plain.yml"
    plain.write_text(yaml.safe_dump(_slerp((base, ft[0]))))
    weighted = tmp_path / "weighted.yml"
    weighted.write_text(yaml.safe_dump(_slerp((base, ft[0]), weight=0.7)))
    capsys.readouterr()
    assert main(["merge", str(plain), str(tmp_path / "a"), "--no-copy-tokenizer"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["merge", str(weighted), str(tmp_path / "b"), "--no-copy-tokenizer"]) == 0
    err = capsys.readouterr().err.splitlines()
    # One line per place the parameter is set, printed once for the whole merge (not per tensor).
    assert err == [
        f"{weighted}: models[0].parameters.weight: slerp does not use weight; ignored (as mergekit does)",
        f"{weighted}: models[1].parameters.weight: slerp does not use weight; ignored (as mergekit does)",
    ]
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_name_no_method_takes_is_still_an_error(capsys):
    recipe = _slerp((Path("/m/a"), Path("/m/b")), wieght=0.7)
    with pytest.raises(
        ConfigError,
        match=r"models\[0\].parameters.wieght: unknown parameter for merge_method slerp \(did you mean weight\?\); it takes: t",
    ):
        load_recipe(recipe)
    assert capsys.readouterr().err == ""


def test_the_strict_parser_and_the_search_space_still_refuse_it():
    # A search space (and the recipes the search renders) must not carry a parameter the method
    # ignores: a searched weight would be sampled for nothing.
    recipe = _slerp((Path("/m/a"), Path("/m/b")), weight=0.7)
    with pytest.raises(
        ConfigError,
        match=r"models\[0\].parameters.weight: merge_method slerp does not use `weight`",
    ):
        parse_recipe(recipe, "r.yml")
    with pytest.raises(
        ConfigError,
        match=r"s.yml: models\[0\].parameters.weight: merge_method slerp does not use `weight`",
    ):
        parse_space(
            {
                **recipe,
                "models": [
                    {"model": "/m/a", "parameters": {"weight": {"range": [0.0, 1.0]}}},
                    {"model": "/m/b"},
                ],
            },
            "s.yml",
        )

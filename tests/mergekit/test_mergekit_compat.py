"""Optional: evomerge and mergekit-yaml give the same tensors for the same recipe.

``mergekit-yaml`` is found by ``_mergekit.py`` (``$EVOMERGE_MERGEKIT``, the repository's
``.venv-mk/bin/``, PATH). Without one the tests are skipped, except under CI, where they fail. Each method's recipe is merged by both tools from the same tiny float32 models (absolute paths);
deterministic methods must agree to float32 rounding, random ones (DARE, DELLA) in kept fraction
and L1 norm of the merged task vector.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _mergekit import find
from safetensors.torch import load_file

from evomerge.engine import merge_to_disk

MERGEKIT = find("mergekit-yaml")
pytestmark = MERGEKIT.marks
_mergekit_present = MERGEKIT.present


def recipes(base: Path, ft: list[Path]) -> dict[str, dict[str, Any]]:
    b, f = str(base), [str(x) for x in ft]

    def tv(method: str, **extra: Any) -> dict[str, Any]:
        per = [
            {"weight": w, "density": d, **extra} for w, d in ((0.6, 0.5), (0.4, 0.7), (0.3, 0.6))
        ]
        return {
            "merge_method": method,
            "base_model": b,
            "models": [{"model": b}]
            + [{"model": m, "parameters": p} for m, p in zip(f, per, strict=False)],
            "dtype": "float32",
        }

    slices = lambda *ms: [{"sources": [{"model": m, "layer_range": [0, 4]} for m in ms]}]  # noqa: E731
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip(f, (0.5, 0.3, 0.2), strict=False)
            ],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": b,
            "slices": slices(b, f[0]),
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "task_arithmetic": tv("task_arithmetic") | {"parameters": {"lambda": 0.8}},
        "ties": tv("ties"),
        "breadcrumbs": tv("breadcrumbs", gamma=0.05),
        "breadcrumbs_ties": tv("breadcrumbs_ties", gamma=0.05),
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": b,
            "models": [{"model": m} for m in [b, *f]],
            "dtype": "float32",
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": b,
            "models": [
                {"model": b},
                {"model": f[0], "parameters": {"weight": 0.3}},
                {"model": f[1], "parameters": {"weight": 0.7}},
            ],
            "dtype": "float32",
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip(f, (0.5, 0.3, 0.2), strict=False)
            ],
            "dtype": "float32",
        },
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": m} for m in f],
            "dtype": "float32",
        },
        "sce": {
            "merge_method": "sce",
            "base_model": b,
            "models": [{"model": m} for m in [b, *f]],
            "parameters": {"select_topk": 0.5},
            "dtype": "float32",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, 3]}]},
                {"sources": [{"model": f[0], "layer_range": [1, 4]}]},
            ],
            "dtype": "float32",
        },
        "dare_ties": tv("dare_ties"),
        "dare_linear": tv("dare_linear"),
        "della": tv("della", epsilon=0.1),
        "della_linear": tv("della_linear", epsilon=0.1),
        # mergekit 0.1.5's newer methods; epsilon = 0.05 leaves about 2/3 of each task vector unchanged (noise sd 0.05).
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": b,
            "models": [{"model": b}, {"model": f[0]}],
            "parameters": {"t": [{"filter": "mlp", "value": 0.02}, {"value": 0.05}]},
            "dtype": "float32",
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": b,
            "models": [{"model": b}, {"model": f[0]}],
            "dtype": "float32",
        },
        "ram": {
            "merge_method": "ram",
            "base_model": b,
            "models": [{"model": m} for m in [b, *f]],
            "parameters": {"epsilon": 0.05},
            "dtype": "float32",
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": b,
            "models": [{"model": m} for m in [b, *f]],
            "parameters": {"epsilon": 0.05, "r": 0.5, "alpha": 2.0},
            "dtype": "float32",
        },
    }


RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
METHODS = sorted(recipes(Path("b"), [Path("x"), Path("y"), Path("z")]))


@pytest.fixture(scope="module")
def both(tiny_family, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Merge every recipe with both tools (mergekit two at a time: its start-up dominates)."""
    base, ft = tiny_family
    root = tmp_path_factory.mktemp("compat")
    out: dict[str, tuple[Path, Path]] = {}
    rs = recipes(base, ft)

    def mk(name: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        cmd = [
            str(MERGEKIT.path),
            str(root / f"{name}.yml"),
            str(root / f"{name}_mk"),
            "--no-copy-tokenizer",
            "--quiet",
            "--random-seed",
            "0",
        ]
        return name, subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
        )

    for name, r in rs.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(r, sort_keys=False))
        merge_to_disk(r, root / f"{name}_em", seed=0)
        out[name] = (root / f"{name}_em", root / f"{name}_mk")
    with ThreadPoolExecutor(2) as pool:
        for name, proc in pool.map(mk, rs):
            assert proc.returncode == 0, f"mergekit failed on {name}: {proc.stderr[-2000:]}"
    return out


def _load(d: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("method", METHODS)
def test_same_tensors_as_mergekit(method: str, both, tiny_family) -> None:
    em, mk = (_load(p) for p in both[method])
    assert set(em) == set(mk), set(em) ^ set(mk)
    if method not in RANDOM:
        tol = 1e-5
        bad = total = 0
        for name in em:
            diff = (em[name].float() - mk[name].float()).abs()
            scale = mk[name].float().abs().max().clamp(min=1.0)
            if method == "ties" or method.startswith("breadcrumbs"):
                # Magnitude ranking at exact ties may pick different elements: allow a tiny fraction.
                bad += int((diff > tol * scale).sum())
                total += diff.numel()
            else:
                assert float(diff.max()) <= tol * float(scale), (name, float(diff.max()))
        if total:
            assert bad <= 1e-3 * total, (bad, total)
        return
    base = _load(tiny_family[0])
    kept_e = kept_m = n = 0
    l1_e = l1_m = 0.0
    for name in em:
        de, dm = em[name].float() - base[name].float(), mk[name].float() - base[name].float()
        kept_e += int((de != 0).sum())
        kept_m += int((dm != 0).sum())
        n += de.numel()
        l1_e += float(de.abs().sum())
        l1_m += float(dm.abs().sum())
    assert abs(kept_e - kept_m) / n < 0.01, (kept_e / n, kept_m / n)
    assert abs(l1_e - l1_m) / l1_m < 0.03, (l1_e, l1_m)

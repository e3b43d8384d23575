"""Optional: evomerge and mergekit 0.1.5 where a recipe's bfloat16 changes the result.

mergekit computes a recipe in its ``dtype`` (bfloat16 for most recipes: every input and every
operation rounded to it); evomerge computes in float32 and writes the recipe's dtype. The two then
agree within a few bfloat16 steps, except where a discrete choice depends on the rounding: there
evomerge makes the choice as mergekit does.

- arcee_fusion keeps the changes whose importance reaches a threshold. The threshold and the
  importances are computed in the recipe's dtype (or, without one, the inputs' stored dtype), so
  both tools keep the same entries: tiny Mistral models, a base and one fine-tune, stored in float32
  (recipes in bfloat16 and float16) and in bfloat16 (a recipe without ``dtype``). The kept changes
  are added in float32: within 1.5 bfloat16 steps of mergekit, which adds them in float32 to the
  bfloat16 base after rounding them to bfloat16 (and writes float32).
- nuslerp on a LLaVA's 4-D patch embedding (64 x 3 x 4 x 4), for every layout (flattened, rows
  of the last axis, vectors along the first axis; with and without a base): in float32 the two
  tools give the same bits, so the tensor is split into the same vectors. In bfloat16 mergekit
  rounds each cosine, and where a row of 4 points nearly opposite to the other (cos < -0.9), the
  slerp divides that rounding by sin(angle): only those rows are more than 8 bfloat16 steps off.

mergekit runs in one process of its own Python (``_mergekit_runner.py``), found by ``_mergekit.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _mergekit import find
from _mergekit_basic import build_llava
from _tiny import make_tiny, perturbed
from safetensors.torch import load_file

from evomerge.engine import merge_to_disk

MK_PY = find("python")
pytestmark = MK_PY.marks
_mergekit_present = MK_PY.present

STEP = 2.0**-8  # one bfloat16 step relative to a tensor's largest magnitude
PATCH = "vision_tower.embeddings.patch_embedding.weight"
LAYOUTS = [(rw, fl) for rw in (False, True) for fl in (False, True)]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    """A model's tensors as float32, under evomerge's names (mergekit prefixes LLaVA's with ``model.``)."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update({k.removeprefix("model."): v.float() for k, v in load_file(f).items()})
    return sd


def _nuslerp(a: str, b: str, base: str | None, row_wise: bool, flatten: bool, dtype: str):
    r: dict[str, Any] = {"merge_method": "nuslerp"}
    if base is not None:
        r["base_model"] = base
    r["models"] = [
        {"model": a, "parameters": {"weight": 0.6}},
        {"model": b, "parameters": {"weight": 0.4}},
    ]
    r["parameters"] = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    r["dtype"] = dtype
    return r


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, tuple[dict[str, Any], Path, Path]]:
    """Every recipe merged by both tools: name -> (recipe, evomerge's output, mergekit's output)."""
    root = tmp_path_factory.mktemp("mkbf16")
    base = make_tiny(root / "base", seed=0, arch="mistral")
    ft = perturbed(base, root / "ft", seed=1, scale=0.05)
    base16 = make_tiny(root / "base16", seed=0, arch="mistral", dtype=torch.bfloat16)
    ft16 = perturbed(base16, root / "ft16", seed=1, scale=0.05)
    vlm = [build_llava(root / f"vlm_{n}", 400 + i) for i, n in enumerate("abc")]

    def fusion(b: Path, f: Path, dtype: str | None) -> dict[str, Any]:
        r = {"merge_method": "arcee_fusion", "base_model": str(b)}
        r["models"] = [{"model": str(b)}, {"model": str(f)}]
        return r | ({"dtype": dtype} if dtype else {})

    recipes = {
        "fusion_bfloat16": fusion(base, ft, "bfloat16"),
        "fusion_float16": fusion(base, ft, "float16"),
        "fusion_stored_bf16": fusion(base16, ft16, None),
    }
    for dtype in ("bfloat16", "float32"):
        for with_base in (False, True):
            for row_wise, flatten in LAYOUTS:
                name = f"nuslerp_{dtype}_base{int(with_base)}_rw{int(row_wise)}_fl{int(flatten)}"
                b = vlm[2] if with_base else None
                recipes[name] = _nuslerp(vlm[0], vlm[1], b, row_wise, flatten, dtype)
    jobs, out = [], {}
    for name, r in recipes.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(r, sort_keys=False))
        merge_to_disk(r, root / f"{name}_em", seed=0)
        jobs.append(
            {"id": name, "config": str(root / f"{name}.yml"), "out": str(root / f"{name}_mk")}
        )
        out[name] = (r, root / f"{name}_em", root / f"{name}_mk")
    (root / "jobs.json").write_text(json.dumps(jobs))
    runner = Path(__file__).parents[1] / "_mergekit_runner.py"
    proc = subprocess.run(
        [str(MK_PY.path), str(runner), str(root / "jobs.json"), str(root / "results.json")],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, res in json.loads((root / "results.json").read_text()).items():
        assert res["error"] is None, f"mergekit failed on {name}: {res['error']}"
    return out


@pytest.mark.parametrize("name", ["fusion_bfloat16", "fusion_float16", "fusion_stored_bf16"])
def test_arcee_fusion_keeps_the_entries_mergekit_keeps(name: str, merged) -> None:
    recipe, em_dir, mk_dir = merged[name]
    em, mk, base = _tensors(em_dir), _tensors(mk_dir), _tensors(Path(recipe["base_model"]))
    dtype = getattr(torch, recipe.get("dtype", "bfloat16"))
    assert set(em) == set(mk)
    kept_somewhere = False
    for k, m in mk.items():
        e, b = (
            em[k],
            base[k].to(dtype).float(),
        )  # an entry not kept is the base, in the recipe's dtype
        kept_em, kept_mk = e != b, m != b
        assert torch.equal(kept_em, kept_mk), (
            f"{k}: {int((kept_em != kept_mk).sum())} of {m.numel()} entries kept by one tool only"
        )
        kept_somewhere |= bool(kept_mk.any() and not kept_mk.all())
        worst = float((e - m).abs().max()) / (float(m.abs().max()) * STEP or 1.0)
        assert worst <= 1.5, f"{k}: {worst:.2f} bfloat16 steps from mergekit"
    assert kept_somewhere, "no tensor keeps some changes and reverts others: the test shows nothing"


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("row_wise", "flatten"), LAYOUTS)
def test_nuslerp_splits_a_4d_tensor_as_mergekit_does(row_wise, flatten, with_base, merged) -> None:
    tag = f"base{int(with_base)}_rw{int(row_wise)}_fl{int(flatten)}"
    _, em_dir, mk_dir = merged[f"nuslerp_float32_{tag}"]
    em, mk = _tensors(em_dir), _tensors(mk_dir)
    assert tuple(mk[PATCH].shape) == (64, 3, 4, 4)
    # float32: the same vectors, the same arithmetic, the same bits (every tensor mergekit writes).
    for k, m in mk.items():
        assert torch.equal(em[k], m), f"{k}: {float((em[k] - m).abs().max()):.3g} from mergekit"
    # bfloat16: more than 8 steps off only in the rows whose vectors point nearly opposite ways.
    recipe, em_dir, mk_dir = merged[f"nuslerp_bfloat16_{tag}"]
    e, m = _tensors(em_dir)[PATCH], _tensors(mk_dir)[PATCH]
    src = [_tensors(Path(x["model"]))[PATCH] for x in recipe["models"]]
    if with_base:
        c = _tensors(Path(recipe["base_model"]))[PATCH]
        src = [s - c for s in src]
    if flatten:
        v0, v1, off = src[0].reshape(-1), src[1].reshape(-1), (e - m).reshape(-1)
    elif row_wise:  # vectors along the first axis
        v0, v1, off = (x.transpose(0, -1) for x in (src[0], src[1], e - m))
    else:  # rows of the last axis
        v0, v1, off = src[0], src[1], e - m
    cos = torch.nn.functional.cosine_similarity(v0, v1, dim=-1).unsqueeze(-1)
    far = off.abs() > 8 * STEP * float(m.abs().max())
    assert not (far & (cos >= -0.9)).any(), (
        f"{int((far & (cos >= -0.9)).sum())} entries more than 8 bfloat16 steps from mergekit in rows with cos >= -0.9"
    )

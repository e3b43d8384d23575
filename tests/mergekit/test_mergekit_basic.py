"""Optional: mergekit's own basic merge tests (``tests/test_basic_merges.py``, 33 cases) through evomerge.

Every recipe of those tests (:mod:`_mergekit_basic`) is merged by ``evomerge merge``'s library call
and by mergekit 0.1.5 (``_mergekit_runner.py`` run by mergekit's Python, found by ``_mergekit.py``;
skipped without it, an error under CI). Each case must either:

- merge, pass mergekit's own checks (``run_and_check_merge``: a model file, ``config.json``, no NaN,
  every tensor the architecture needs), load in transformers with no missing or unexpected key, pass
  the case's own check (GPT-2 stacked to 24 layers, ``o_proj`` scaled to 0), and agree with
  mergekit's tensors; or
- be refused in one line, exit code 2, nothing written, where mergekit refuses too.

Every recipe mergekit merges is also merged by evomerge in the ``modules:`` form mergekit writes for
it (``MergeConfiguration.to_yaml()`` after planning), to the same tensors (the same digest).

Agreement, for recipes in bfloat16 (all of mergekit's):

- with mergekit computing in float32 and writing bfloat16 (the recipe with ``dtype: float32,
  out_dtype: bfloat16``; evomerge always computes in float32): every element within one bfloat16
  step (2^-8 of the tensor's largest magnitude); a magnitude-ranking method (ties, sce, ram,
  ramplus_tl) may pick other elements at exact ties, up to 0.1% of a tensor (measured: at most 0.44
  of a step, all but the slerp recipes bit for bit, ``bench/bench_mergekit_basic.py``);
- with mergekit's own bfloat16 run of the recipe, where mergekit rounds inputs and every operation to
  bfloat16: every element within 8 such steps for the weighted sums, 32 for the spherical methods
  (slerp, nuslerp, multislerp, karcher: norms and angles in bfloat16; measured up to 22, on a LLaVA's
  3072-element patch embedding, while the float32 comparison stays within one step); the methods that select
  elements by magnitude (ties, sce, ram, ramplus_tl) may select differently, up to 1% of a tensor;
- arcee_fusion keeps the changes whose KL-based importance reaches a threshold, and evomerge decides
  that mask in the recipe's dtype as mergekit does: within 1.5 steps of mergekit's bfloat16 run
  everywhere (the kept changes are added in float32), while mergekit computing in float32 keeps
  other entries (at most 15% of a tensor differ from it by more than one step);
- random masks (dare_ties, della) cannot match element for element: the fraction of kept deltas
  and the L1 norm of the merged task vector agree within 1 point and 3%.

LLaVA: mergekit 0.1.5 under transformers 5 writes no tensor of the language model (its
checkpoint-key conversion does not map ``language_model.model.*``), so evomerge's language tensors
are compared with mergekit's merge of the same recipe over the language models alone (saved as Llama
checkpoints). evomerge writes a LLaVA's tensors under the checkpoint names transformers'
``save_pretrained`` writes (``vision_tower.*``); mergekit names its modules ``model.vision_tower.*``,
so its tensor check counts a name as present when its own checkpoint-key conversion finds it, as it
does for the source models (``_mergekit_runner.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _mergekit import find
from _mergekit_basic import RANDOM, Basic, Run, cases, run_all
from safetensors.torch import load_file

from evomerge.engine import merge_to_disk
from evomerge.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[2]
MK_PY = find("python")  # mergekit's own Python, which runs _mergekit_runner.py
pytestmark = MK_PY.marks
_mergekit_present = MK_PY.present

SELECTING = {
    "ties",
    "sce",
    "ram",
    "ramplus_tl",
}  # magnitude ranks: exact ties may pick other elements
SPHERICAL = {
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
}  # norms and angles: mergekit rounds each to bfloat16
STEP = 2.0**-8  # one bfloat16 step relative to a tensor's largest magnitude
NAMES = [
    c.name
    for c in cases(
        {
            k: k
            for k in (
                "llama_a",
                "llama_b",
                "llama_c",
                "granite_a",
                "granite_b",
                "gpt2",
                "vlm_a",
                "vlm_b",
                "vlm_c",
            )
        }
    )
]


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> Basic:
    """Every case merged by both tools (mergekit in two processes), with mergekit's checks applied."""
    return run_all(tmp_path_factory.mktemp("mkbasic"), str(MK_PY.path))


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(f).items()})
    return sd


def _loaded(d: Path) -> dict[str, torch.Tensor]:
    """Load with the class the config names; no key may be missing or unexpected. Model-layout names."""
    import transformers

    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, arch).from_pretrained(
        d, output_loading_info=True, dtype=torch.float32
    )
    bad = {k: sorted(v)[:3] for k, v in info.items() if v}
    assert not bad, f"{d.name} does not load cleanly as {arch}: {bad}"
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _off(
    em: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rename: Any = None
) -> dict[str, tuple[float, float]]:
    """Per reference tensor: (largest difference, fraction of elements over 8 steps), in bf16 steps of its scale."""
    stats = {}
    for name, m in ref.items():
        e = em[rename(name) if rename else name]
        d = (e - m).abs() / (float(m.abs().max()) * STEP or 1.0)
        stats[name] = (float(d.max()), float((d > 8).float().mean()))
    return stats


def _check_agree(
    method: str,
    em: dict[str, torch.Tensor],
    mk: dict[str, torch.Tensor],
    mk32: dict[str, torch.Tensor] | None,
    where: str,
    rename: Any = None,
) -> None:
    assert mk, f"{where}: mergekit wrote no tensor to compare with"
    if mk32 is not None:  # mergekit computing in float32, as evomerge does
        for name, (worst, _) in _off(em, mk32, rename).items():
            if method in SELECTING or method == "arcee_fusion":
                e, m = em[rename(name) if rename else name], mk32[name]
                frac = float(((e - m).abs() > float(m.abs().max()) * STEP).float().mean())
                limit32 = 0.15 if method == "arcee_fusion" else 0.001
                assert frac <= limit32, (
                    f"{where} {name}: {frac:.2%} of elements differ from mergekit (float32 compute)"
                )
            else:
                assert worst <= 1.0, (
                    f"{where} {name}: {worst:.2f} bf16 steps from mergekit (float32 compute)"
                )
    for name, (worst, frac) in _off(em, mk, rename).items():
        if method in RANDOM:
            continue
        if method == "arcee_fusion":
            assert worst <= 1.5, (
                f"{where} {name}: {worst:.2f} bf16 steps from mergekit's bfloat16 merge"
            )
        elif method in SELECTING:
            assert frac <= 0.01, (
                f"{where} {name}: {frac:.2%} of elements more than 8 bf16 steps from mergekit's bfloat16 merge"
            )
        else:
            steps = 32.0 if method in SPHERICAL else 8.0
            assert worst <= steps, (
                f"{where} {name}: {worst:.1f} bf16 steps from mergekit's bfloat16 merge"
            )


def _check_random(
    em: dict[str, torch.Tensor],
    mk: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    where: str,
    rename: Any = None,
) -> None:
    kept_e = kept_m = n = 0
    l1_e = l1_m = 0.0
    for name, m in mk.items():
        e = em[rename(name) if rename else name]
        de, dm = e - base[name], m - base[name]
        kept_e += int((de.abs() > 1e-6).sum())
        kept_m += int((dm.abs() > 1e-6).sum())
        n += de.numel()
        l1_e += float(de.abs().sum())
        l1_m += float(dm.abs().sum())
    assert abs(kept_e - kept_m) / n < 0.01, (
        f"{where}: kept {kept_e / n:.3f} of deltas, mergekit {kept_m / n:.3f}"
    )
    assert abs(l1_e - l1_m) / l1_m < 0.03, (
        f"{where}: L1 of the merged task vector {l1_e:.4g}, mergekit {l1_m:.4g}"
    )


def _llava_text_name(name: str) -> str:
    return (
        name if name == "lm_head.weight" else "model.language_model." + name.removeprefix("model.")
    )


def _refused_in_one_line(run: Run) -> None:
    out = run.em.with_name(run.em.name + "_cli")
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "merge", str(run.yml), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists(), "a refused merge wrote its output directory"


@pytest.mark.parametrize("name", NAMES + ["extra_llava_gradients"])
def test_mergekit_basic_case(name: str, basic) -> None:
    case, runs = basic.runs[name]
    for i, run in enumerate(runs):
        where = f"{name}[{case.labels[i] if case.labels else i}]"
        mk_res = run.results[""]
        if case.mergekit_refuses:
            assert mk_res["error"] and mk_res["error"].startswith("ValueError"), (
                f"{where}: mergekit was expected to refuse: {mk_res}"
            )
            assert run.em_error and "\n" not in run.em_error, (
                f"{where}: evomerge merged a recipe mergekit refuses"
            )
            _refused_in_one_line(run)
            continue
        assert mk_res["error"] is None, f"{where}: mergekit failed: {mk_res['error']}"
        assert run.em_error is None, f"{where}: evomerge refused: {run.em_error}"
        # The same recipe in the modules: form mergekit wrote for it merges to the same tensors.
        modules = run.yml.with_name(run.yml.stem + ".modules.yml")
        modules.write_text(mk_res["modules_yaml"])
        assert "modules:" in mk_res["modules_yaml"]
        again = merge_to_disk(
            load_recipe(modules), run.em.with_name(run.em.name + "_modules"), seed=0
        )
        assert again.digest == run.digest, f"{where}: the modules: form merges to other tensors"
        check = mk_res["checks"][str(run.em)]
        assert check["ok"], (
            f"{where}: mergekit's checks fail on evomerge's output: {check['problems']}"
        )
        em = _loaded(run.em)
        if case.validate == "stack24":
            assert json.loads((run.em / "config.json").read_text())["n_layer"] == 24
        if case.validate == "o_proj0":
            raw = _tensors(run.em)
            assert any("o_proj" in k for k in raw) and all(
                (v == 0).all() for k, v in raw.items() if "o_proj" in k
            )
            assert raw["lm_head.weight"].count_nonzero() > 0
        method = run.recipe["merge_method"]
        mk = _tensors(run.mk)
        if method in RANDOM:
            base = _loaded(Path(run.recipe["base_model"]))
            _check_random(em, mk, base, where)
        else:
            _check_agree(method, em, mk, _tensors(run.mk32) if run.mk32 else None, where)
        if (
            run.text is not None
        ):  # the LLaVA's language model, against mergekit on the language models alone
            text_mk = _tensors(run.text[0])
            assert len(text_mk) == sum(
                k.startswith(("model.language_model.", "lm_head.")) for k in em
            )
            if method in RANDOM:
                assert run.text_base is not None
                _check_random(
                    em,
                    text_mk,
                    _tensors(run.text_base),
                    where + " language model",
                    _llava_text_name,
                )
            else:
                _check_agree(
                    method,
                    em,
                    text_mk,
                    _tensors(run.text[1]),
                    where + " language model",
                    _llava_text_name,
                )


def test_llava_names_are_the_checkpoints_own(basic) -> None:
    """evomerge's LLaVA output is named like transformers' own checkpoint (the source), not like mergekit's modules.

    mergekit's tensor check by exact name rejects the source model just as it rejects evomerge's
    output (the same names 'missing'); through mergekit's own checkpoint-key conversion it accepts both.
    """
    _, runs = basic.runs["test_linear_VLM_merge"]
    em_check = runs[0].results[""]["checks"][str(runs[0].em)]
    assert basic.source_check["ok"] and em_check["ok"]
    assert basic.source_check["strict_missing"] and sorted(
        basic.source_check["strict_missing"]
    ) == sorted(em_check["strict_missing"])
    assert set(_tensors(runs[0].em)) == set(_tensors(basic.source))

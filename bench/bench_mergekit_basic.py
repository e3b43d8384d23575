"""mergekit's basic merge tests through evomerge and mergekit 0.1.5: the tally and how far apart the tensors are.

    python bench/bench_mergekit_basic.py [--mergekit-python .venv-mk/bin/python]

Runs the 33 cases of mergekit's ``tests/test_basic_merges.py`` (and the LLaVA gradient extras)
exactly as ``tests/mergekit/test_mergekit_basic.py`` does (``tests/_mergekit_basic.py``) and prints, per case,
whether both tools merged, mergekit's checks on evomerge's output, and the largest difference from
mergekit's tensors in bfloat16 steps of each tensor's scale (2^-8 of its largest magnitude): against
mergekit computing in float32 (``f32``) and in bfloat16 as the recipe says (``bf16``, with the share of
elements more than 8 steps off). Random-mask methods print the kept fraction and the L1 norm ratio of
the merged task vector instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _mergekit_basic import RANDOM, run_all  # noqa: E402


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(f).items()})
    return sd


def _model_layout(d: Path) -> dict[str, torch.Tensor]:
    import json

    import transformers

    transformers.logging.set_verbosity_error()
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(d, dtype=torch.float32)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _steps(
    em: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rename=None
) -> tuple[float, float]:
    worst, over, n = 0.0, 0, 0
    for name, m in ref.items():
        e = em[rename(name) if rename else name]
        d = (e - m).abs() / (float(m.abs().max()) * 2.0**-8 or 1.0)
        worst = max(worst, float(d.max()))
        over += int((d > 8).sum())
        n += d.numel()
    return worst, over / max(n, 1)


def _random(em, mk, base, rename=None) -> tuple[float, float, float]:
    ke = km = n = 0
    le = lm = 0.0
    for name, m in mk.items():
        de, dm = em[rename(name) if rename else name] - base[name], m - base[name]
        ke += int((de.abs() > 1e-6).sum())
        km += int((dm.abs() > 1e-6).sum())
        n += de.numel()
        le += float(de.abs().sum())
        lm += float(dm.abs().sum())
    return ke / n, km / n, le / lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mergekit-python",
        default=str(Path(__file__).resolve().parents[1] / ".venv-mk" / "bin" / "python"),
    )
    args = ap.parse_args()

    def text_name(n):
        return n if n == "lm_head.weight" else "model.language_model." + n.removeprefix("model.")  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        basic = run_all(Path(tmp), args.mergekit_python)
        print(
            f"both tools over {sum(len(r) for _, r in basic.runs.values())} recipes: {time.perf_counter() - start:.0f} s\n"
        )
        print(
            f"{'case':40} {'recipes':>7}  {'result':28} {'f32 steps':>9} {'bf16 steps':>10} {'bf16 >8':>8}"
        )
        agree = refused = 0
        for name, (_case, runs) in basic.runs.items():
            worst32 = worst16 = frac16 = 0.0
            result = "agree"
            for run in runs:
                mk = run.results[""]
                if mk["error"] or run.em_error:
                    result = (
                        "both refuse"
                        if (mk["error"] and run.em_error)
                        else f"DIFFER: em={run.em_error!r} mk={mk['error']!r}"
                    )
                    continue
                if not mk["checks"][str(run.em)]["ok"]:
                    result = "FAILS mergekit's checks"
                em = _model_layout(run.em)
                pairs = [(_tensors(run.mk), _tensors(run.mk32) if run.mk32 else None, None)]
                if run.text is not None:
                    pairs.append(
                        (
                            _tensors(run.text[0]),
                            _tensors(run.text[1]) if run.mk32 else None,
                            text_name,
                        )
                    )
                for mk16, mk32, rename in pairs:
                    if run.recipe["merge_method"] in RANDOM:
                        base = (
                            _model_layout(Path(run.recipe["base_model"]))
                            if rename is None
                            else _tensors(run.text_base)
                        )
                        ke, km, l1 = _random(em, mk16, base, rename)
                        result = f"agree (kept {ke:.3f}/{km:.3f}, L1 x{l1:.3f})"
                        continue
                    w16, f16 = _steps(em, mk16, rename)
                    w32, _ = _steps(em, mk32, rename) if mk32 is not None else (0.0, 0.0)
                    worst16, frac16, worst32 = (
                        max(worst16, w16),
                        max(frac16, f16),
                        max(worst32, w32),
                    )
            if not name.startswith("extra"):
                agree += result.startswith("agree")
                refused += result == "both refuse"
            print(
                f"{name:40} {len(runs):>7}  {result:28} {worst32:>9.2f} {worst16:>10.1f} {frac16:>8.2%}"
            )
        print(f"\nmergekit's 33 cases: {agree} agree, {refused} refused by both")


if __name__ == "__main__":
    main()

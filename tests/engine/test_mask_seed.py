"""``search.mask_seed`` seeds the random masks (dare, della) apart from the sampler's seed, and the
export records it so that the exported recipe re-merges to the trial's tensors."""

from __future__ import annotations

import pytest
import yaml
from _fake_eval import TaskVectorEvaluator

from evomerge.cli import main
from evomerge.engine import digest_model_dir
from evomerge.search.loop import run_search
from evomerge.search.table import load_trials

pytestmark = pytest.mark.slow


def _space(path, base, fts, **search):
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": str(base),
                "models": [
                    {
                        "model": str(f),
                        "parameters": {"weight": 0.5, "density": {"range": [0.3, 0.7]}},
                    }
                    for f in fts[:2]
                ],
                "dtype": "float32",
                "search": {"trials": 2, "seed": 3, "finalists": 1, "sampler": "random", **search},
            },
            sort_keys=False,
        )
    )
    return path


def test_mask_seed_changes_the_masks_not_the_points_and_exports(tmp_path, tiny_family):
    base, fts = tiny_family
    runs = {}
    for name, extra in (("plain", {}), ("masked", {"mask_seed": 11})):
        space = _space(tmp_path / f"{name}.yml", base, fts, **extra)
        out = run_search(
            space,
            evaluator=TaskVectorEvaluator(base, fts),
            results_dir=tmp_path / "r",
            quiet=True,
            log=lambda m: None,
        )
        df = load_trials(out.paths.csv)
        runs[name] = (space, df[df["baseline"] == ""].sort_values("number"))
    plain, masked = runs["plain"][1], runs["masked"][1]
    # the same sampler seed gives the same points, another mask seed other tensors
    assert plain["p_density.ft0"].tolist() == masked["p_density.ft0"].tolist()
    assert not set(plain["digest"]) & set(masked["digest"])
    space, df = runs["masked"]
    best = tmp_path / "best.yml"
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(tmp_path / "r"),
                "--trial",
                str(int(df["number"].iloc[0])),
                "-o",
                str(best),
            ]
        )
        == 0
    )
    assert "# evomerge-seed: 11" in best.read_text()
    assert main(["merge", str(best), str(tmp_path / "out")]) == 0
    assert digest_model_dir(tmp_path / "out") == df["digest"].iloc[0]

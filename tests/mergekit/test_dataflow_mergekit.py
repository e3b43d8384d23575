"""Optional (mergekit-yaml 0.1.5, see ``_mergekit.py``): the chosen trials of a data-flow search and of
a PS+DFS search on the demo zoo export to passthrough recipes that ``mergekit-yaml`` builds into the
path's tensors, and that lm-eval scores exactly as the trials were scored.

In PS+DFS the path runs the layers of a merge, which mergekit builds with its own arithmetic (float32
in another order: a few ulps from evomerge's, see the README); its logits then agree with the
trial's to 1e-3, and ``evomerge export --merge`` builds the same path bit for bit (1e-5)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from _mergekit import find

from evomerge.cli import main
from evomerge.dataflow import compare_built, parse_candidate
from evomerge.search.loop import Search
from evomerge.search.setup import prepare
from evomerge.search.table import load_trials

MERGEKIT = find("mergekit-yaml")
pytestmark = MERGEKIT.marks
_mergekit_present = MERGEKIT.present
SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from evomerge.zoo import ensure_zoo

    root = tmp_path_factory.mktemp("dfzoo")
    old = os.environ.get("EVOMERGE_ZOO_DIR")
    os.environ["EVOMERGE_ZOO_DIR"] = str(root)
    try:
        yield ensure_zoo("demo", root)
    finally:
        if old is None:
            os.environ.pop("EVOMERGE_ZOO_DIR", None)
        else:
            os.environ["EVOMERGE_ZOO_DIR"] = old


def small(name: str, tmp: Path, trials: int, **section) -> Path:
    data = yaml.safe_load((SPACES / f"{name}.yml").read_text())
    data["evaluate"]["limit"] = 30
    data["evaluate"]["holdout"] = {"tasks": data["evaluate"]["holdout"]["tasks"], "limit": 30}
    data["search"].update(trials=trials, finalists=1)
    if "dataflow" in data:
        data["dataflow"].update(section)
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mergekit(recipe: Path, out: Path) -> None:
    r = subprocess.run(
        [MERGEKIT.path, str(recipe), str(out)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]


def export_build_and_rescore(space: Path, tmp: Path, search: Search, capsys, atol: float) -> None:
    results = tmp / "results"
    best = tmp / f"{space.stem}.best.yml"
    assert main(["export", str(space), "-o", str(best), "--results-dir", str(results)]) == 0
    number = int(capsys.readouterr().out.split("trial ")[1].split()[0])
    for part in sorted(tmp.glob(f"{space.stem}.best.*.yml")):  # a merged source, built first
        mergekit(part, tmp / part.stem)
    built = tmp / f"{space.stem}.mk"
    mergekit(best, built)
    records = search.open_study()
    cand = parse_candidate(
        yaml.safe_load(records.trial(records.study.trials[number]).recipe), "trial"
    )
    dirs = {
        n: tmp / f"{space.stem}.best.{n}" if not isinstance(v, str) else Path(_dir(v))
        for n, v in cand.sources.items()
    }
    n, worst = compare_built(cand, {k: dirs[k] for k in cand.used_sources()}, built)
    assert n > 0 and worst == 0.0, worst
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(built)).eval()
    again = search.setup.evaluator.evaluate(model, "search")
    row = load_trials(results / search.setup.paths.name)
    row = row[row["number"] == number].iloc[0]
    for task, value in again.scores.items():
        assert value == pytest.approx(row[f"s_{task}"], abs=1e-12), task
    # and the logits agree with the trial's in-memory model to float tolerance
    resident, _ = search.candidates.materialize(cand.to_mapping(), "again")
    ids = torch.tensor([[1, 5, 9, 3, 17, 40, 2, 11]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, resident(ids).logits, atol=atol)


def _dir(ref: str) -> str:
    from evomerge.schemes import resolve

    return str(resolve(ref) or ref)


def test_dfs_and_ps_dfs_exports_build_with_mergekit_and_score_as_their_trials(
    zoo, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    dfs = small("demo_dataflow", tmp_path, trials=3, repeats=1)
    search = Search(prepare(dfs, results_dir=results, log=lambda m: None), quiet=True)
    search.run()
    export_build_and_rescore(dfs, tmp_path, search, capsys, atol=1e-5)
    # PS+DFS: the PS study first (demo.yml), then the DFS over its best trial
    ps = small("demo", tmp_path, trials=3)
    Search(prepare(ps, results_dir=results, log=lambda m: None), quiet=True).run()
    ps_dfs = small("demo_ps_dfs", tmp_path, trials=3)
    search = Search(prepare(ps_dfs, results_dir=results, log=lambda m: None), quiet=True)
    search.run()
    df = load_trials(results / "demo_ps_dfs")
    assert "source:ps" in set(df["baseline"])
    export_build_and_rescore(ps_dfs, tmp_path, search, capsys, atol=1e-3)
    # evomerge builds the merge source as the search merged it: the path's logits to 1e-5
    out = tmp_path / "ev"
    args = ["export", str(ps_dfs), "-o", str(tmp_path / "ev.yml"), "--merge", str(out)]
    assert main([*args, "--results-dir", str(results)]) == 0
    assert "tensors are the path's of trial" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    df = load_trials(results / "demo_ps_dfs")
    number = int(df[df["chosen"].astype(bool)]["number"].iloc[0])
    records = search.open_study()
    cand = yaml.safe_load(records.trial(records.study.trials[number]).recipe)
    resident, _ = search.candidates.materialize(cand, "again")
    ids = torch.tensor([[1, 5, 9, 3, 17, 40, 2, 11]])
    with torch.no_grad():
        built = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert torch.allclose(built(ids).logits, resident(ids).logits, atol=1e-5)

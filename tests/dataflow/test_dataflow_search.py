"""Data-flow searches end to end: trials, reuse of identical paths, resume, finalists, export and
``--merge`` (the built tensors are the path's), PS+DFS (a finished study's best trial as a source),
and several workers on the demo zoo with lm-eval."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _spaces import write_space
from _tiny import make_tiny

from evomerge.cli import main
from evomerge.evaluation.fake import FakeEvaluator
from evomerge.results.leaderboard import summary
from evomerge.search.loop import run_search
from evomerge.search.records import StudyRecords
from evomerge.search.table import load_trials

pytestmark = pytest.mark.slow  # every test runs a search

IDS = torch.tensor(
    [[5, 9, 3, 17, 40, 2, 11, 33, 7, 60, 21, 8], [1, 4, 4, 50, 13, 2, 9, 9, 30, 6, 44, 3]]
)


def logits_evaluator(targets: list[Path]) -> FakeEvaluator:
    """Task ``i`` scores how close a model's next-token distribution is to fine-tune ``i``'s on a few
    fixed inputs (``exp(-KL)``): it runs the model, so it scores paths of any depth. Validation and
    test scores are the search score times 0.97 and 0.96."""
    from transformers import AutoModelForCausalLM

    logps = []
    for t in targets:
        m = AutoModelForCausalLM.from_pretrained(str(t)).eval()
        with torch.no_grad():
            logps.append(torch.log_softmax(m(IDS).logits, -1))

    def score(model: torch.nn.Module, split: str) -> dict[str, float]:
        with torch.no_grad():
            logp = torch.log_softmax(model(IDS).logits, -1)
        factor = {"search": 1.0, "test": 0.96}.get(split, 0.97)
        return {
            f"task_{i}": math.exp(-float((t.exp() * (t - logp)).sum(-1).mean())) * factor
            for i, t in enumerate(logps)
        }

    return FakeEvaluator(
        [f"task_{i}" for i in range(len(targets))], score, fingerprint=[str(t) for t in targets]
    )


def dfs_space(
    path: Path, sources: list[Any], trials: int = 12, baselines: list | None = None, **section: Any
) -> Path:
    data = {
        "dataflow": {"sources": sources, "repeats": 1, **section},
        "search": {
            "trials": trials,
            "seed": 3,
            "finalists": 2,
            "sampler": "tpe",
            "startup_trials": 4,
            "baselines": baselines or [],
        },
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def export_and_build(space: Path, best: Path, out: Path, results: Path, capsys) -> str:
    """``evomerge export --merge`` of the chosen trial; returns what it printed."""
    args = ["export", str(space), "-o", str(best), "--merge", str(out)]
    code = main([*args, "--results-dir", str(results)])
    text = capsys.readouterr().out
    assert code == 0 and "tensors are the path's of trial" in text, text
    return text


def test_a_dataflow_search_reuses_identical_paths_resumes_and_rescores(tiny_family, tmp_path):
    base, fts = tiny_family
    # 3 searched slots and a fixed scale: 8 paths, so 12 trials must meet one twice
    frank = {  # a hand-written path, scored as a baseline
        "merge_method": "dataflow",
        "sources": {"a": str(fts[0])},
        "path": [["a", 0, 1.0], ["a", 1, 1.0], ["a", 1, 1.0], ["a", 2, 1.0], ["a", 3, 1.0]],
    }
    space = dfs_space(
        tmp_path / "s.yml",
        [str(fts[0]), str(fts[1])],
        slots=[1, 2, 5],
        first="fixed",
        scale=1.0,
        baselines=[{"name": "frank", "recipe": frank}],
    )
    ev = logits_evaluator(fts[:2])
    logs: list[str] = []
    out = run_search(space, evaluator=ev, results_dir=tmp_path / "r", quiet=True, log=logs.append)
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    assert (searched["state"] == "COMPLETE").sum() == 12
    assert (searched["method"] == "dataflow").all() and searched["digest"].str.startswith(
        "dfs1-"
    ).all()
    reused = searched[searched["reused_from"].notna()]
    assert len(reused) >= 4
    for _, row in reused.iterrows():  # the same path, the same scores, not scored again
        src = searched[searched["number"] == int(float(row["reused_from"]))].iloc[0]
        assert (
            row["digest"] == src["digest"] and row["score"] == src["score"] and row["eval_s"] == 0
        )
    # the sources alone and their uniform merge are the baselines
    assert sorted(df.loc[df["baseline"] != "", "baseline"]) == sorted(
        [f"source:{fts[0]}", f"source:{fts[1]}", "uniform", "hand:frank"]
    )
    hand = df[df["baseline"] == "hand:frank"].iloc[0]
    assert hand["method"] == "dataflow" and hand["digest"].startswith("dfs1-")
    assert hand["state"] == "COMPLETE" and hand["score"] > 0
    # finalists re-built from their stored paths: same digest (no warning), holdout scored
    assert not [m for m in logs if "different tensor hash" in m]
    assert searched["validation"].notna().sum() >= 2
    # resume to 16 trials: the first 12 rows are kept
    out2 = run_search(
        space, evaluator=ev, results_dir=tmp_path / "r", quiet=True, log=logs.append, trials=16
    )
    df2 = load_trials(out2.paths.csv)
    s2 = df2[df2["baseline"] == ""]
    assert (s2["state"] == "COMPLETE").sum() == 16
    assert (
        s2.set_index("number").loc[searched["number"], "digest"].tolist()
        == searched["digest"].tolist()
    )


def test_export_of_a_path_builds_and_scores_what_the_trial_scored(tiny_family, tmp_path, capsys):
    base, fts = tiny_family
    space = dfs_space(
        tmp_path / "s.yml", [str(fts[0]), str(fts[1]), str(fts[2])], trials=6, max_depth=6
    )
    ev = logits_evaluator(fts)
    run_search(space, evaluator=ev, results_dir=tmp_path / "r", quiet=True, log=lambda m: None)
    best, out_dir = tmp_path / "best.yml", tmp_path / "built"
    text = export_and_build(space, best, out_dir, tmp_path / "r", capsys)
    recipe = yaml.safe_load(best.read_text())
    assert recipe["merge_method"] == "passthrough" and recipe["slices"]
    number = int(text.split("trial ")[1].split()[0])
    df = load_trials(tmp_path / "r" / "s" / "trials.csv")
    row = df[df["number"] == number].iloc[0]
    from transformers import AutoModelForCausalLM

    built = AutoModelForCausalLM.from_pretrained(str(out_dir)).eval()
    again = ev.evaluate(built)
    assert again.aggregate == pytest.approx(row["score"], abs=1e-5)


def test_sources_of_different_depths_search_without_a_uniform_baseline(tiny_family, tmp_path):
    base, fts = tiny_family
    deep = make_tiny(tmp_path / "deep", seed=7, num_hidden_layers=6)  # 6 layers beside 4
    space = dfs_space(tmp_path / "s.yml", [str(fts[0]), str(deep)], trials=3, max_depth=6)
    out = run_search(
        space,
        evaluator=logits_evaluator([fts[0], deep]),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(out.paths.csv)
    # no average of a 4-layer and a 6-layer model exists: each source alone is the baseline
    assert sorted(df.loc[df["baseline"] != "", "baseline"]) == sorted(
        [f"source:{fts[0]}", f"source:{deep}"]
    )
    assert (df.loc[df["baseline"] != "", "state"] == "COMPLETE").all()
    assert (df.loc[df["baseline"] == "", "state"] == "COMPLETE").sum() == 3
    assert summary(out, df).splitlines()[-1].endswith("every source model")


def test_ps_then_dfs_takes_the_best_trial_of_a_finished_study(tiny_family, tmp_path, capsys):
    base, fts = tiny_family
    ev = logits_evaluator(fts)
    ps = write_space(tmp_path / "ps.yml", base, fts, trials=5, sampler="random")
    ps_data = yaml.safe_load(ps.read_text())
    ps_data["merge_method"] = "task_arithmetic"
    for m in ps_data["models"]:
        m["parameters"].pop("density")
    ps.write_text(yaml.safe_dump(ps_data, sort_keys=False))
    results = tmp_path / "r"
    run_search(ps, evaluator=ev, results_dir=results, quiet=True, log=lambda m: None)
    ps_df = load_trials(results / "ps" / "trials.csv")
    ps_best = ps_df[ps_df["chosen"].astype(bool)].iloc[0]  # what `evomerge export` of it takes
    space = dfs_space(
        tmp_path / "dfs.yml",
        [{"study": "ps.yml", "name": "ps"}, str(fts[0])],
        trials=4,
        first="fixed",
    )
    logs: list[str] = []
    out = run_search(space, evaluator=ev, results_dir=results, quiet=True, log=logs.append)
    assert f"dataflow source ps: trial {int(ps_best['number'])} of the study of" in "\n".join(logs)
    df = load_trials(out.paths.csv)
    # the first stage's merge, alone, scores what it scored in its own study
    alone = df[df["baseline"] == "source:ps"].iloc[0]
    assert alone["score"] == pytest.approx(ps_best["score"], abs=1e-9)
    # an export names the merge's own recipe file and the directory it is merged into
    best = tmp_path / "best.yml"
    export_and_build(space, best, tmp_path / "built", results, capsys)
    recipe = yaml.safe_load(best.read_text())
    models = {s["sources"][0]["model"] for s in recipe["slices"]}
    assert str((tmp_path / "best.ps").absolute()) in models  # first: fixed, the path starts in ps
    assert (tmp_path / "best.ps.yml").is_file() and (tmp_path / "best.ps" / "config.json").is_file()


def test_several_workers_share_a_dataflow_study(tmp_path):
    from evomerge.zoo import ensure_zoo

    zoo = ensure_zoo("demo", tmp_path / "zoo")
    data = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "search_spaces" / "demo_dataflow.yml").read_text()
    )
    data["dataflow"]["repeats"] = 1
    data["evaluate"]["limit"] = 10
    data["evaluate"]["holdout"] = {"tasks": data["evaluate"]["holdout"]["tasks"], "limit": 10}
    data["search"].update(trials=4, finalists=1)
    space = tmp_path / "dfs.yml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "EVOMERGE_ZOO_DIR": str(zoo.parent)}
    cmd = [
        sys.executable,
        "-m",
        "evomerge.cli",
        "search",
        str(space),
        "--workers",
        "2",
        "--device",
        "cpu",
    ]
    r = subprocess.run(
        [*cmd, "--results-dir", str(tmp_path / "r")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "[w0] " in r.stdout and "[w1] " in r.stdout
    df = load_trials(tmp_path / "r" / "demo_dataflow")
    searched = df[df["baseline"] == ""]
    assert searched["state"].isin(["COMPLETE", "PRUNED"]).sum() == 4
    assert (searched["method"] == "dataflow").all()


def test_ps_dfs_starts_from_the_first_stage_merge_once(tiny_family, tmp_path):
    base, fts = tiny_family
    ev = logits_evaluator(fts)
    ps = write_space(tmp_path / "ps.yml", base, fts, trials=4, sampler="random")
    results = tmp_path / "r"
    run_search(ps, evaluator=ev, results_dir=results, quiet=True, log=lambda m: None)
    ps_df = load_trials(results / "ps" / "trials.csv")
    ps_best = ps_df[ps_df["chosen"].astype(bool)].iloc[0]
    # the demo_ps_dfs shape: the merge's layers twice over, first and last fixed
    section = {"repeats": 2, "first": "fixed", "last": "fixed"}
    space = dfs_space(
        tmp_path / "dfs.yml", [{"study": "ps.yml", "name": "ps"}], trials=3, **section
    )
    logs: list[str] = []
    out = run_search(space, evaluator=ev, results_dir=results, quiet=True, log=logs.append)
    assert "dataflow source ps: its own path (4 layers, scales 1) queued as a first trial" in logs
    df = load_trials(out.paths.csv)
    first = df[df["number"] == 0].iloc[0]
    recipe = yaml.safe_load(StudyRecords(_study(out)).trial(_study(out).trials[0]).recipe)
    assert recipe["path"] == [["ps", i, 1.0] for i in range(4)]
    assert first["baseline"] == "" and first["state"] == "COMPLETE"  # a searched trial
    # the merge computed as a path scores what the merge scores (in its own study and here)
    alone = df[df["baseline"] == "source:ps"].iloc[0]
    assert first["score"] == pytest.approx(alone["score"], rel=1e-6)
    assert first["score"] == pytest.approx(ps_best["score"], rel=1e-6)
    assert df.loc[df["baseline"] == "", "score"].max() >= first["score"]
    # resumed, and set up again after a change of the space: not queued a second time
    logs.clear()
    run_search(space, evaluator=ev, results_dir=results, quiet=True, log=logs.append, trials=5)
    data = yaml.safe_load(space.read_text())
    data["dataflow"]["max_depth"] = 6
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    run_search(space, evaluator=ev, results_dir=results, quiet=True, log=logs.append, trials=6)
    assert any("the space changed since study" in m for m in logs)
    assert not any("queued" in m for m in logs), logs
    study = _study(out)
    queued = [t.number for t in study.trials if "fixed_params" in t.system_attrs]
    assert queued == [0] and len(study.trials) == 6
    # start: none queues nothing
    data["dataflow"]["start"] = "none"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    logs.clear()
    out = run_search(
        space, evaluator=ev, results_dir=results, quiet=True, log=logs.append, study="none"
    )
    assert not any("queued" in m for m in logs)
    assert not [t for t in _study(out).trials if "fixed_params" in t.system_attrs]


def _study(out: Any) -> Any:
    import optuna

    return optuna.load_study(study_name=out.paths.name, storage=out.paths.storage)

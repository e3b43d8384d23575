"""Data-flow search on the demo zoo (issue 22): PS, DFS, PS+DFS, and structured against flat DFS.

Every arm runs the real search (``evomerge search``, one process per run, lm-eval on the zoo's
tasks, one thread) with pruning off, so that every trial scores every search item and arms with the
same number of trials spent the same evaluations. The measure is what a user would export: the
trial chosen by search score (``evaluate.holdout.validation: 0``: no validation items, every holdout
item is a test item), reported by its **test score** on the 300 holdout items, which chose nothing.
Arms (``--arms``):

- ``ps``: ``search_spaces/demo.yml`` (parameter space: task arithmetic or TIES, per-half weights),
  ``--trials`` trials.
- ``dfs``: ``search_spaces/demo_dataflow.yml`` (a path through the three experts' layers,
  structured: a slot's scale only where it is on, TPE), ``--trials`` trials.
- ``dfs_flat_tpe``: the same space with ``layout: flat`` (every on/off and scale a number), TPE.
- ``dfs_flat_cmaes``: ``layout: flat`` with CMA-ES over the flat vector.
- ``ps_dfs``: ``search_spaces/demo_ps_dfs.yml``: a PS search of half the trials, then a DFS search
  of the other half over its best trial by search score (the same total of evaluations).
- ``ps_then_dfs``: the PS run of ``ps`` (same seed; run it first), then ``--trials`` DFS trials
  over its best trial: twice the evaluations of ``ps``; compare it with ``ps2x``.
- ``ps2x``: ``demo.yml`` with twice ``--trials``.

``cost`` measures, in one process, what one trial costs: it prepares the PS space (``demo.yml``), the
DFS space (``demo_dataflow.yml``) and the PS+DFS space over a PS study's chosen trial, draws random
points of each (Optuna's random sampler), and alternates them (PS, DFS, PS+DFS, PS, ...): the seconds
to build each candidate (a merge into the resident model; a path pointed at resident layers) and to
score it on the 300 search items. It prints the medians and the ratios, per point kind.

For a PS+DFS arm the table also shows the first stage's chosen trial (its test score), and "picked": the
test score of whichever of the two stages' chosen trials has the higher search score (what a user would
keep, choosing on search items only). Each run appends one JSON line to ``--out`` as it finishes (an
interrupted bench resumes; runs already there are skipped); ``report`` prints the table.

Usage:
    python bench/bench_dataflow.py run --arms ps dfs ps_dfs --seeds 0 1 2 3 4 --out results/bench_dataflow.jsonl [--jobs 2]
    python bench/bench_dataflow.py report --out results/bench_dataflow.jsonl
    python bench/bench_dataflow.py cost --points 12 [--work results/bench_dataflow_cost]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
ARMS = ("ps", "dfs", "dfs_flat_tpe", "dfs_flat_cmaes", "ps_dfs", "ps_then_dfs", "ps2x")


def _space(
    name: str, study: str, work: Path, trials: int, **search: Any
) -> tuple[Path, dict[str, Any]]:
    data = yaml.safe_load((SPACES / f"{name}.yml").read_text())
    data["search"].update({"trials": trials, "prune": False, **search})
    data["search"].pop("baselines", None)
    data["evaluate"]["holdout"]["validation"] = 0  # choose by search score; report on test items
    data["study"] = {"name": study}
    return work / f"{study}.yml", data


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _search(space: Path, seed: int, work: Path) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "evomerge.cli", "search", str(space), "--seed", str(seed)]
    r = subprocess.run(
        [*cmd, "--results-dir", str(work / "results")], cwd=work, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"{space.name}: exit {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
    return time.perf_counter() - t0


def _best(work: Path, study: str) -> dict[str, Any]:
    """The chosen trial (the best by search score: no validation items) and its test score."""
    import pandas as pd

    df = pd.read_csv(work / "results" / study / "trials.csv")
    t = df[(df["baseline"].fillna("") == "") & (df["state"] == "COMPLETE")]
    row = t[t["chosen"].astype(bool)].iloc[0]
    assert row["score"] == t["score"].max(), "the chosen trial is not the best by search score"
    dfs = t[t["method"] == "dataflow"]
    ratio = (dfs["merge_s"] / dfs["eval_s"]).dropna()
    ratio = ratio[dfs.loc[ratio.index, "reused_from"].isna()] if "reused_from" in dfs else ratio
    return {
        "trial": int(row["number"]),
        "search": float(row["score"]),
        "test": float(row["test"]),
        "trials": int(len(t)),
        "merge_over_eval": float(ratio.median()) if len(ratio) else None,
        "depth": _depth(work, study, int(row["number"])),
    }


def _depth(work: Path, study: str, number: int) -> int | None:
    """Steps of a data-flow trial's path (None for a merge)."""
    import optuna

    from evomerge.search.records import StudyRecords

    url = f"sqlite:///{work / 'results' / study / 'study.db'}"
    s = optuna.load_study(study_name=study, storage=url)
    recipe = yaml.safe_load(StudyRecords(s).trial(s.trials[number]).recipe or "{}")
    return len(recipe["path"]) if recipe.get("merge_method") == "dataflow" else None


def run_arm(arm: str, seed: int, trials: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"arm": arm, "seed": seed, "trials": trials}
    wall = 0.0
    if arm in ("ps", "ps2x"):
        n = trials * (2 if arm == "ps2x" else 1)
        path, data = _space("demo", f"{arm}_{seed}", work, n, sampler="tpe")
        wall += _search(_write(path, data), seed, work)
        out["final"] = _best(work, f"{arm}_{seed}")
    elif arm.startswith("dfs"):
        layout = "flat" if "flat" in arm else "structured"
        sampler = "cmaes" if arm.endswith("cmaes") else "tpe"
        path, data = _space("demo_dataflow", f"{arm}_{seed}", work, trials, sampler=sampler)
        data["dataflow"]["layout"] = layout
        wall += _search(_write(path, data), seed, work)
        out["final"] = _best(work, f"{arm}_{seed}")
    else:  # two stages: PS, then DFS over its best trial by search score
        first_trials = trials // 2 if arm == "ps_dfs" else trials
        stage1 = f"ps_{seed}" if arm == "ps_then_dfs" else f"{arm}_ps_{seed}"
        path1, data1 = _space("demo", stage1, work, first_trials, sampler="tpe")
        if not (work / "results" / stage1 / "trials.csv").is_file():
            wall += _search(_write(path1, data1), seed, work)
        else:
            _write(path1, data1)
        out["stage1"] = _best(work, stage1)
        n2 = trials - first_trials if arm == "ps_dfs" else trials
        path2, data2 = _space("demo_ps_dfs", f"{arm}_{seed}", work, n2, sampler="tpe")
        for s in data2["dataflow"]["sources"]:
            if isinstance(s, dict) and "study" in s:
                s["study"], s["trial"] = str(path1), out["stage1"]["trial"]
        wall += _search(_write(path2, data2), seed, work)
        out["final"] = _best(work, f"{arm}_{seed}")
        a, b = out["stage1"], out["final"]
        out["picked"] = b["test"] if b["search"] > a["search"] else a["test"]
    out["wall_s"] = round(wall, 1)
    return out


def _load(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    )


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["arm"], r["seed"], r["trials"]) for r in _load(out)}
    work = Path(args.work).resolve()
    # ps_then_dfs reuses the ps run of its seed: run every ps first
    todo = [
        (a, s)
        for a in sorted(args.arms, key=lambda a: a != "ps")
        for s in args.seeds
        if (a, s, args.trials) not in done
    ]

    def one(job: tuple[str, int]) -> None:
        arm, seed = job
        r = run_arm(
            arm,
            seed,
            args.trials,
            work / f"{arm}_{seed}" if arm != "ps_then_dfs" else work / f"ps_{seed}",
        )
        r["machine"] = f"{platform.machine()} {os.cpu_count()} cores"
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{arm} seed {seed}: {json.dumps(r['final'])} ({r['wall_s']} s)", flush=True)

    firsts = [j for j in todo if j[0] == "ps"]
    rest = [j for j in todo if j[0] != "ps"]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, firsts))
        list(pool.map(one, rest))


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def cmd_report(args: argparse.Namespace) -> None:
    rows = _load(Path(args.out))
    print(
        "| arm | trials (evaluations) | seeds | test score of the trial chosen by search, median [min, max] | its search score | first stage's chosen trial, test | picked by search | merge / eval time (DFS trials, median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        by_trials: dict[int, list[dict[str, Any]]] = {}
        for r in rs:
            by_trials.setdefault(r["trials"], []).append(r)
        for n, group in sorted(by_trials.items()):
            evals = {"ps2x": 2 * n, "ps_then_dfs": 2 * n}.get(arm, n)
            ratios = [
                r["final"]["merge_over_eval"]
                for r in group
                if r["final"].get("merge_over_eval") is not None
            ]
            print(
                f"| {arm} | {evals} | {len(group)} | {_fmt([r['final']['test'] for r in group])} "
                f"| {_fmt([r['final']['search'] for r in group])} "
                f"| {_fmt([r['stage1']['test'] for r in group if 'stage1' in r])} "
                f"| {_fmt([r['picked'] for r in group if 'picked' in r])} "
                f"| {f'{100 * statistics.median(ratios):.2f}%' if ratios else '-'} |"
            )
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nper seed (test score of the chosen trial), seeds {seeds}:")
    for arm in ARMS:
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if rs:
            print(f"  {arm:<15} " + "  ".join(f"{r['final']['test']:.3f}" for r in rs))
    if rows:
        print(
            f"\nmachine: {rows[0].get('machine')}; {len(rows)} runs, {sum(r['wall_s'] for r in rows) / 60:.0f} min of runs"
        )
    nan = [r for r in rows if math.isnan(r["final"]["test"])]
    if nan:
        print(f"warning: {len(nan)} runs have no test score for their chosen trial")


def cmd_cost(args: argparse.Namespace) -> None:
    import optuna
    import torch

    from evomerge.search.candidates import Candidates
    from evomerge.search.samplers import suggester
    from evomerge.search.setup import prepare

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results"
    quiet = lambda m: None  # noqa: E731
    ps_path, ps_data = _space("demo", "cost_ps", work, 8, sampler="tpe")
    if not (results / "cost_ps" / "trials.csv").is_file():  # the PS+DFS source: a small PS study
        _search(_write(ps_path, ps_data), 0, work)
    spaces = {"ps": _write(ps_path, ps_data)}
    path, data = _space("demo_dataflow", "cost_dfs", work, 1)
    spaces["dfs"] = _write(path, data)
    path, data = _space("demo_ps_dfs", "cost_ps_dfs", work, 1)
    for src in data["dataflow"]["sources"]:
        if isinstance(src, dict) and "study" in src:
            src["study"] = str(ps_path)
    spaces["ps_dfs"] = _write(path, data)
    kinds = {}
    for kind, space in spaces.items():
        setup = prepare(space, results_dir=results, log=quiet)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
        kinds[kind] = (setup, Candidates(setup.merger, setup.evaluator), study)
    times: dict[str, dict[str, list[float]]] = {k: {"build": [], "eval": []} for k in kinds}
    # the first point of each kind loads its sources (a merge source is merged once): not counted
    for i in range(args.points + 1):
        for kind, (setup, cands, study) in kinds.items():
            recipe = setup.space.render(suggester(study.ask()), setup.layers_of, setup.prompts)
            t0 = time.perf_counter()
            with torch.no_grad():
                model, _ = cands.materialize(recipe, f"{kind} point {i}")
            t1 = time.perf_counter()
            setup.evaluator.evaluate(model, "search")
            t2 = time.perf_counter()
            if i:
                times[kind]["build"].append(t1 - t0)
                times[kind]["eval"].append(t2 - t1)
    ps_build = statistics.median(times["ps"]["build"])
    print(
        f"{args.points} points of each kind, interleaved; torch threads {torch.get_num_threads()}"
    )
    print(
        "| candidate | build s (median) | eval s (median) | build / eval (median) | build / PS build |"
    )
    print("|---|---|---|---|---|")
    for kind, t in times.items():
        ratio = statistics.median(b / e for b, e in zip(t["build"], t["eval"], strict=True))
        print(
            f"| {kind} | {statistics.median(t['build']):.4f} | {statistics.median(t['eval']):.3f} "
            f"| {100 * ratio:.2f}% | {statistics.median(t['build']) / ps_build:.3f} |"
        )
    print(f"machine: {platform.machine()} {os.cpu_count()} cores (shared)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:5]))
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    r.add_argument("--trials", type=int, default=40)
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--work", default="results/bench_dataflow")
    r.add_argument("--out", default="results/bench_dataflow.jsonl")
    p = sub.add_parser("report")
    p.add_argument("--out", default="results/bench_dataflow.jsonl")
    c = sub.add_parser("cost")
    c.add_argument("--points", type=int, default=12)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--work", default="results/bench_dataflow_cost")
    args = ap.parse_args()
    {"run": cmd_run, "report": cmd_report, "cost": cmd_cost}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Sampler benchmark on the demo zoo (issue 12, part 4): which Optuna sampler finds the best merge
for the same number of trials?

Every sampler runs the same space at the same trial budget over several seeds, through the real
search loop (``evomerge.search.Search``: in-memory merges, lm-eval on the zoo's tasks, one thread).
The measure: the **validation score of the best trial by search score so far** (its score on
holdout items the choice by search score did not see), after each trial. The loop re-scores every
new best on the validation items the moment
it appears (a later trial that only ties the best does not replace it), so the curve is read off the
results table with no extra evaluation; baselines are skipped (they are the same for every run and
do not feed the sampler) and ``finalists`` is 0 (finalists only add holdout scores of non-best trials).

Variants (``--samplers``):

- ``random``: ``search.sampler: random``.
- ``tpe``: ``search.sampler: tpe`` as shipped (multivariate, group, constant_liar).
- ``tpe_indep``: TPE with each parameter sampled on its own (``multivariate=False``; Optuna 5's
  default is multivariate, 4's independent), same startup trials.
- ``cmaes``: ``search.sampler: cmaes``. On a space with a ``choice`` (the demo's method) the space
  parser refuses cmaes; the bench then builds the sampler itself, so that Optuna's CMA-ES samples the
  continuous values present in every trial and falls back to independent random sampling for the
  rest (the method choice and the TIES densities).
- ``gp``: ``search.sampler: gp``.

Pruning (``search.prune``) is off unless ``--prune`` (then the spaces' default rounds): a pruned
trial counts as a trial and for its items, and never becomes the best.

Results go to a JSON-lines file, one line per run (appended as runs finish, so several processes may
share the work and an interrupted bench resumes); ``--report`` prints the table and writes the plot.

Usage:
    python bench/bench_samplers.py --spaces demo demo_per_layer --seeds 0 1 2 3 4 --out results/samplers.jsonl
    python bench/bench_samplers.py --report --out results/samplers.jsonl --plot docs/benchmarks/samplers.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("random", "tpe", "tpe_indep", "cmaes", "gp")
MARKS = (10, 20)


def _sampler_override(variant: str) -> Any:
    """A replacement for ``make_sampler`` (same signature) for variants that no space setting
    names; None when the shipped ``make_sampler`` builds the variant."""
    import optuna

    from evomerge.search import samplers

    def build(
        name: str, seed: int, n_trials: int, startup: int | None = None, multi: bool = False
    ) -> Any:
        startup = startup if startup is not None else max(4, min(10, n_trials // 4))
        if variant == "tpe_indep":
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=startup, multivariate=False
            )
        return samplers.make_sampler(variant, seed, n_trials, startup)

    return build if variant in ("tpe_indep", "cmaes") else None


def run_one(
    space_name: str,
    variant: str,
    seed: int,
    trials: int,
    workdir: Path,
    startup: int | None = None,
    prune: bool = False,
) -> dict[str, Any]:
    """One search; returns its per-trial curve (best search score so far, the holdout score of that
    best trial, search items evaluated so far), its wall time and the time per trial spent outside
    merging and evaluating (the sampler's ask, mostly)."""
    import pandas as pd

    from evomerge.search import loop
    from evomerge.search.setup import prepare
    from evomerge.search.table import load_trials

    data = yaml.safe_load((ROOT / "search_spaces" / f"{space_name}.yml").read_text())
    override = _sampler_override(variant)
    # The space file names the sampler unless the bench builds it (cmaes with a choice, tpe_indep):
    # then it names random, which the parser accepts for any space, and make_sampler is replaced.
    data["search"].update(
        {"sampler": "random" if override else variant, "finalists": 0, "prune": prune}
    )
    data["search"].pop("baselines", None)
    if startup is not None:
        data["search"]["startup_trials"] = startup
    data["study"] = {"name": f"{space_name}_{variant}_{seed}"}
    space = workdir / f"{space_name}_{variant}_{seed}.yml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    original = loop.make_sampler
    if override:
        loop.make_sampler = override
    try:
        t0 = time.perf_counter()
        setup = prepare(
            space,
            trials=trials,
            seed=seed,
            results_dir=workdir / "results",
            log=lambda m: None,
            threads=1,
        )
        search = loop.Search(setup, quiet=True)
        search.setup.baselines = {}  # the same for every run, and not seen by the sampler
        calls: list[tuple[str, int, float]] = []
        evaluator = search.candidates.evaluator
        search.candidates.evaluator = _Counting(evaluator, calls)
        out = search.run()
        wall = time.perf_counter() - t0
    finally:
        loop.make_sampler = original
    df = load_trials(out.paths.csv)
    t = df[df["baseline"] == ""].sort_values("number")
    search_items = [n for split, n, _ in calls if split == "search"]
    busy = sum(sec for _, _, sec in calls) + float(t["merge_s"].fillna(0).sum())
    best = -math.inf
    best_holdout = math.nan
    curve_search, curve_holdout, items, used = [], [], [], 0
    k = 0
    for r in t.itertuples():
        if r.state == "PRUNED":  # stopped early: counts as a trial and its items, never the best
            used += int(r.items)
            curve_search.append(best)
            curve_holdout.append(best_holdout)
            items.append(used)
            continue
        if r.state != "COMPLETE":
            continue
        if "items" in t.columns:
            used += 0 if pd.isna(r.items) else int(r.items)
        elif pd.isna(r.reused_from):  # a trial that reused another's scores evaluated nothing
            used += search_items[k]
            k += 1
        if r.score > best:
            best, best_holdout = float(r.score), float(r.validation)
            if math.isnan(best_holdout):
                raise RuntimeError(f"trial {r.number} became the best but has no holdout score")
        curve_search.append(best)
        curve_holdout.append(best_holdout)
        items.append(used)
    return {
        "space": space_name,
        "sampler": variant,
        "seed": seed,
        "trials": trials,
        "startup": startup,
        "prune": prune,
        "wall_s": round(wall, 1),
        **({} if prune else {"other_s_per_trial": round((wall - busy) / trials, 3)}),
        "best_search": curve_search,
        "best_holdout": curve_holdout,
        "items": items,
        "score_se": float(t["score_se"].median()),
        "methods": t["method"].value_counts().to_dict(),
    }


class _Counting:
    """An evaluator that records (split, items scored) for every evaluation it passes on."""

    def __init__(self, inner: Any, calls: list[tuple[str, int, float]]) -> None:
        self.inner, self.calls = inner, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def evaluate(self, model: Any, split: str = "search") -> Any:
        t0 = time.perf_counter()
        r = self.inner.evaluate(model, split)
        self.calls.append(
            (split, int(sum(getattr(r, "n_items", {}).values())), time.perf_counter() - t0)
        )
        return r


def _load(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )


def _stats(vals: list[float]) -> tuple[float, float, float, float, float]:
    q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
    return statistics.median(vals), q[0], q[2], min(vals), max(vals)


def report(runs: list[dict[str, Any]], trials: int, plot: Path | None) -> None:
    """Print the table (median [IQR] (min-max) of the best holdout at 10, 20, ``trials`` and 40
    trials, over the seeds whose runs reached that many) and write the plot (curves up to ``trials``)."""
    spaces = list(dict.fromkeys(r["space"] for r in runs))
    marks = sorted({*MARKS, trials, 40})
    for space in spaces:
        rs = [r for r in runs if r["space"] == space]
        se = statistics.median(r["score_se"] for r in rs)
        print(
            f"\n== {space}: best holdout (holdout score of the best trial by search score so far), "
            f"median [IQR] (min-max) /seeds; a search score's standard error is {se:.3f}"
        )
        print(
            f"{'sampler':10} "
            + " ".join(f"{'@' + str(m) + ' trials':>32}" for m in marks)
            + f" {'best search @' + str(trials):>16} {'other s/trial':>13}"
        )
        for variant in VARIANTS:
            vr = [r for r in rs if r["sampler"] == variant and len(r["best_holdout"]) >= trials]
            if not vr:
                continue
            cells = []
            for m in marks:
                vals = [r["best_holdout"][m - 1] for r in vr if len(r["best_holdout"]) >= m]
                if vals:
                    med, q1, q3, lo, hi = _stats(vals)
                    cells.append(f"{med:.3f} [{q1:.3f}-{q3:.3f}] ({lo:.2f}-{hi:.2f}) /{len(vals)}")
                else:
                    cells.append("-")
            bs = [r["best_search"][trials - 1] for r in vr]
            other = [r["other_s_per_trial"] for r in vr if "other_s_per_trial" in r]
            print(
                f"{variant:10} "
                + " ".join(f"{c:>32}" for c in cells)
                + f" {statistics.median(bs):>16.3f} {(f'{statistics.median(other):.2f}' if other else '-'):>13}"
            )
            by_seed = {r["seed"]: r["best_holdout"][trials - 1] for r in vr}
            line = f"{'':10} by seed {sorted(by_seed)}: best holdout @{trials} " + ", ".join(
                f"{v:.3f}" for _, v in sorted(by_seed.items())
            )
            rand = {
                r["seed"]: r["best_holdout"][trials - 1]
                for r in rs
                if r["sampler"] == "random" and len(r["best_holdout"]) >= trials
            }
            diff = [by_seed[k] - rand[k] for k in sorted(by_seed) if k in rand]
            if (
                variant != "random" and diff
            ):  # paired by seed: the same random startup trials (cmaes: its first 5)
                line += f"; minus random's: median {statistics.median(diff):+.3f}, better/equal/worse on {sum(d > 0 for d in diff)}/{sum(d == 0 for d in diff)}/{sum(d < 0 for d in diff)} seeds"
            print(line)
    if plot is not None:
        _plot(
            [
                {**r, **{k: r[k][:trials] for k in ("best_search", "best_holdout", "items")}}
                for r in runs
                if len(r["best_holdout"]) >= trials
            ],
            spaces,
            plot,
        )
        print(f"\nplot: {plot}")


def _plot(runs: list[dict[str, Any]], spaces: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(spaces), 2, figsize=(12, 4.2 * len(spaces)), squeeze=False)
    colors = dict(
        zip(VARIANTS, ("#555555", "#1f77b4", "#17becf", "#d62728", "#2ca02c"), strict=True)
    )
    for row, space in zip(axes, spaces, strict=True):
        rs = [r for r in runs if r["space"] == space]
        for variant in VARIANTS:
            vr = [r for r in rs if r["sampler"] == variant]
            if not vr:
                continue
            n = min(len(r["best_holdout"]) for r in vr)
            y = np.array([r["best_holdout"][:n] for r in vr])
            x = np.arange(1, n + 1)
            med, q1, q3 = np.median(y, 0), np.percentile(y, 25, 0), np.percentile(y, 75, 0)
            label = f"{variant} ({len(vr)} seeds)"
            row[0].plot(x, med, color=colors[variant], label=label, drawstyle="steps-post")
            row[0].fill_between(x, q1, q3, color=colors[variant], alpha=0.12, step="post")
            # against items: each run's step curve on a common grid of items evaluated
            grid = np.linspace(max(r["items"][0] for r in vr), max(r["items"][-1] for r in vr), 200)
            yi = np.array(
                [_at(np.array(r["items"]), np.array(r["best_holdout"]), grid) for r in vr]
            )
            row[1].plot(grid, np.nanmedian(yi, 0), color=colors[variant], label=label)
            row[1].fill_between(
                grid,
                np.nanpercentile(yi, 25, 0),
                np.nanpercentile(yi, 75, 0),
                color=colors[variant],
                alpha=0.12,
            )
        se = statistics.median(r["score_se"] for r in rs)
        row[0].set_title(
            f"{space}: best holdout vs trials (median, IQR band; search-score SE {se:.3f})",
            fontsize=9,
        )
        row[1].set_title(f"{space}: best holdout vs search items evaluated", fontsize=9)
        row[0].set_xlabel("trials")
        row[1].set_xlabel("search items evaluated")
        for ax in row:
            ax.set_ylabel("holdout score of the best trial so far")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _at(x: Any, y: Any, grid: Any) -> Any:
    import numpy as np

    idx = np.searchsorted(x, grid, side="right") - 1
    return np.where(idx >= 0, y[np.clip(idx, 0, None)], np.nan)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spaces", nargs="+", default=["demo", "demo_per_layer"])
    ap.add_argument("--samplers", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--trials",
        type=int,
        default=40,
        help="trials per run; --report: the curves' length (longer runs are cut there)",
    )
    ap.add_argument(
        "--startup",
        type=int,
        default=None,
        help="random startup trials (default: the space's, i.e. make_sampler's for --trials); a run of N trials with "
        "--startup S is the first N trials of a longer run with the same S",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_samplers.jsonl")
    ap.add_argument(
        "--prune",
        action="store_true",
        help="early stopping on (the space's default search.prune); default: off",
    )
    ap.add_argument(
        "--report", action="store_true", help="only print the table and write the plot from --out"
    )
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    if not args.report:
        from evomerge.zoo import ensure_zoo

        ensure_zoo("demo")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for space in args.spaces:
            for seed in args.seeds:
                for variant in args.samplers:
                    if any(
                        (r["space"], r["sampler"], r["seed"], r.get("prune", False))
                        == (space, variant, seed, args.prune)
                        and r["trials"] >= args.trials
                        for r in _load(args.out)
                    ):
                        continue
                    with tempfile.TemporaryDirectory() as tmp:
                        r = run_one(
                            space, variant, seed, args.trials, Path(tmp), args.startup, args.prune
                        )
                    with args.out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(
                        f"{space:16} {variant:10} seed {seed}: best search {r['best_search'][-1]:.3f}, its holdout "
                        f"{r['best_holdout'][-1]:.3f} ({r['wall_s']:.0f}s)",
                        flush=True,
                    )
    runs = [
        r
        for r in _load(args.out)
        if r["space"] in args.spaces
        and r["sampler"] in args.samplers
        and r.get("prune", False) == args.prune
    ]
    if runs:
        report(runs, args.trials, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

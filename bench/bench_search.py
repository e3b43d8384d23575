"""Search benchmark on the demo zoo (issue 4).

1. One run of ``search_spaces/demo.yml`` at its default budget: per-trial breakdown of wall
   time (ask -> tell) into merge and evaluation, and the share of merge time (target: merge
   at most 10% of a trial's wall time).
2. TPE vs random search over 3 seeds at equal budget: median best holdout score (the holdout
   score of the best trial by search score, i.e. what a user would export).

Usage: python bench/bench_search.py [--trials 40] [--compare-trials 24] [--seeds 0 1 2] [--skip-compare]
Everything runs in a temporary results folder; the zoo is built (or reused) under results/zoo.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(space: Path, results: Path, *, trials: int, seed: int, sampler: str | None = None, study: str) -> tuple[float, "object"]:
    from evomerge.search.table import load_trials
    from evomerge.search.loop import run_search

    if sampler is not None:
        data = yaml.safe_load(space.read_text())
        data["search"]["sampler"] = sampler
        space = results / f"{study}.yml"
        space.parent.mkdir(parents=True, exist_ok=True)
        space.write_text(yaml.safe_dump(data, sort_keys=False))
    t0 = time.perf_counter()
    out = run_search(space, trials=trials, seed=seed, study=study, results_dir=results, quiet=True, log=lambda m: None)
    return time.perf_counter() - t0, load_trials(out.paths.csv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--compare-trials", type=int, default=24)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args()
    space = ROOT / "search_spaces" / "demo.yml"
    from evomerge.zoo import ensure_zoo

    t0 = time.perf_counter()
    ensure_zoo("demo")
    print(f"zoo ready in {time.perf_counter() - t0:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        wall, df = run(space, results, trials=args.trials, seed=0, study="bench_demo")
        t = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
        share = (t["merge_s"] / t["wall_s"]).median()
        print(f"\n== demo search: {len(t)} trials in {wall:.1f}s ({wall / 60:.1f} min, incl. {int((df['baseline'] != '').sum())} baselines and holdout re-scores)")
        print(f"per trial (median): wall {t['wall_s'].median():.2f}s  merge {t['merge_s'].median():.3f}s  eval {t['eval_s'].median():.2f}s")
        ratio = t["merge_s"] / t["wall_s"]
        worst = t.loc[ratio.idxmax()]
        print(f"merge share of trial wall time: median {share:.1%}, 90th percentile {ratio.quantile(0.9):.1%}, "
              f"max {ratio.max():.1%} (trial #{worst['number']}: merge {worst['merge_s']:.3f}s of {worst['wall_s']:.2f}s) (target <= 10%)")
        print(f"totals: merge {t['merge_s'].sum():.1f}s = {t['merge_s'].sum() / t['wall_s'].sum():.1%} of trial wall time")
        best = t.sort_values("score", ascending=False).iloc[0]
        base = df[df["baseline"] != ""].set_index("baseline")
        print(f"best trial #{best['number']}: search {best['score']:.3f}, holdout {best['holdout']:.3f}")
        for name, r in base.iterrows():
            print(f"  baseline {name:<24} search {r['score']:.3f}  holdout {r['holdout']:.3f}")
        if args.skip_compare:
            return 0
        print(f"\n== TPE vs random, {args.compare_trials} trials, seeds {args.seeds}")
        summary: dict[str, list[float]] = {}
        for sampler in ("tpe", "random"):
            for seed in args.seeds:
                wall, df = run(space, results, trials=args.compare_trials, seed=seed, sampler=sampler, study=f"cmp_{sampler}_{seed}")
                t = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
                best = t.sort_values("score", ascending=False).iloc[0]
                summary.setdefault(sampler, []).append(float(best["holdout"]))
                print(f"  {sampler:6} seed {seed}: best search {best['score']:.3f}  its holdout {best['holdout']:.3f}  ({wall:.0f}s)")
        for sampler, vals in summary.items():
            print(f"  {sampler:6} median best holdout over {len(vals)} seeds: {statistics.median(vals):.3f}")
        print(f"  TPE - random (median): {statistics.median(summary['tpe']) - statistics.median(summary['random']):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Search benchmark on the demo zoo (issue 4).

1. One run of ``search_spaces/demo.yml`` at its default budget: per-trial breakdown of wall
   time (ask -> tell) into merge and evaluation, and the share of merge time (target: merge
   at most 10% of a trial's wall time).
2. TPE vs random search over 3 seeds at equal budget: median best holdout score (here and below:
   the validation score of the best trial by search score; the search score chose it, so its
   validation score is an unbiased one).

3. Pruning (``search.prune``, issue 12): the same searches with pruning off and on, per seed, on
   the demo and the per-layer demo: search items evaluated by the trials, in all (baselines and
   holdout re-scores included), the best trial's holdout score; medians and ranges over seeds.
   ``--on-trials N`` gives the runs with pruning another trial budget (more trials for the items
   saved): the best holdout is then compared at equal items, as a curve of the best trial so far
   (by search score) against the search items spent, per seed and as the median over seeds, with
   the items the runs with pruning need to reach the median best holdout of the runs without.
   ``--on-items N`` sets their ``search.items`` (the item budget) with ``--on-trials`` as the cap.
   ``--simulate`` replays the rules of stopping on the per-item values of the runs without
   pruning (each trial against the trials before it that the rule kept), to compare rules and
   their aggressiveness cheaply: items saved, wrong stops, and the best trial kept or not.

Usage: python bench/bench_search.py [--trials 40] [--compare-trials 24] [--seeds 0 1 2] [--skip-compare]
       python bench/bench_search.py --prune [--prune-seeds 0 1 2 3 4] [--prune-spaces demo demo_per_layer demo_gen]
              [--prune-modes off on] [--prune-setting JSON] [--prune-tag on] [--off-tag off] [--on-trials N] [--on-items N]
              [--on-sampler NAME] [--off-sampler NAME] [--keep DIR] [--simulate]
Everything runs in a temporary results folder (or ``--keep DIR``); the zoo is built (or reused) under results/zoo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(
    space: Path,
    results: Path,
    *,
    trials: int,
    seed: int,
    sampler: str | None = None,
    study: str,
    prune: object = "keep",
    items: int | None = None,
) -> tuple[float, object]:
    from evomerge.search.loop import run_search
    from evomerge.search.table import load_trials

    if sampler is not None or prune != "keep" or items:
        data = yaml.safe_load(space.read_text())
        if sampler is not None:
            data["search"]["sampler"] = sampler
        if prune != "keep":
            data["search"]["prune"] = prune
        if items:
            data["search"]["items"] = items
        space = results / f"{study}.yml"
        space.parent.mkdir(parents=True, exist_ok=True)
        space.write_text(yaml.safe_dump(data, sort_keys=False))
    t0 = time.perf_counter()
    out = run_search(
        space,
        trials=trials,
        seed=seed,
        study=study,
        results_dir=results,
        quiet=True,
        log=lambda m: None,
    )
    return time.perf_counter() - t0, load_trials(out.paths.csv)


PRUNE_SPACES = ("demo", "demo_per_layer")


def space_file(name: str) -> Path:
    """A space named by its file under search_spaces/ (``demo_gen``) or by a path."""
    path = Path(name) if name.endswith((".yml", ".yaml")) or "/" in name else None
    path = path or ROOT / "search_spaces" / f"{name}.yml"
    if not path.is_file():
        raise SystemExit(f"--prune-spaces: no space file {path}")
    return path


def best_of(df) -> tuple[float, float]:
    """(search score, validation score) of the best searched COMPLETE trial by search score: every
    new best is re-scored on the validation items, which did not choose it (the search score
    did), so that score is an unbiased one of that trial."""
    t = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
    best = t.sort_values(["score", "number"], ascending=[False, True]).iloc[0]
    return float(best["score"]), float(best["validation"])


def chosen_of(df) -> tuple[float, float]:
    """(validation, test) of the chosen trial (:func:`~evomerge.search.table.chosen_row`: the best
    validation score among the trials re-scored there; what export takes), as the study reports
    them; nan where the table has none."""
    from evomerge.search.table import chosen_row

    row = chosen_row(df[df["baseline"] == ""])
    if row is None:
        return float("nan"), float("nan")
    return float(row.get("validation", float("nan"))), float(row.get("test", float("nan")))


def curve(df) -> list[tuple[int, float]]:
    """(search items spent by the searched trials so far, holdout of the best COMPLETE trial so far by
    search score) after each searched trial, in trial order. Every new best gets its holdout re-score
    when it finishes, so the holdout is known at every point."""
    t = df[df["baseline"] == ""].sort_values("number")
    out, spent, best = [], 0, None
    for _, r in t.iterrows():
        spent += int(r["items"])
        if r["state"] == "COMPLETE" and (best is None or r["score"] > best["score"]):
            best = r
        out.append((spent, float(best["validation"]) if best is not None else float("nan")))
    return out


def at_items(points: list[tuple[int, float]], budget: int) -> float:
    """The best holdout of a run once it has spent at most ``budget`` search items (nan: nothing yet)."""
    got = [h for n, h in points if n <= budget]
    return got[-1] if got else float("nan")


def equal_items(curves: dict[str, list[list[tuple[int, float]]]], step: int) -> None:
    """Best holdout against search items spent, off vs on: the median over seeds at budgets of
    ``step`` items, and the smallest budget at which the runs with pruning reach the median best
    holdout the runs without reach with all their items."""
    off, on = curves["off"], curves["on"]
    full = max(p[-1][0] for p in off)
    target = statistics.median(p[-1][1] for p in off)
    top = max(p[-1][0] for p in on)
    print(
        f"  best holdout at equal search items (median [min, max] over seeds); off: all {full} items -> {target:.3f}"
    )
    reach = None
    for budget in range(step, max(full, top) + step, step):
        a = [at_items(p, budget) for p in off]
        b = [at_items(p, budget) for p in on]
        mb = statistics.median(b) if all(x == x for x in b) else float("nan")
        if reach is None and mb >= target:
            reach = budget
        if budget % (4 * step) == 0 or budget == reach:
            print(
                f"    {budget:6} items: off {_spread(a, '.3f')}  on {_spread(b, '.3f')}"
                + ("   <- on reaches off's final median" if budget == reach else "")
            )
    if reach is None:
        print(f"    the runs with pruning do not reach {target:.3f} within their {top} items")
    else:
        print(
            f"    on reaches off's median best holdout ({target:.3f}) at {reach} search items: {1 - reach / full:.1%} fewer than off's {full}"
        )
    per_seed = [
        next((n for n, h in q if h >= p[-1][1]), None) for p, q in zip(off, on, strict=True)
    ]
    print(
        "    per seed, items on needs to reach that seed's off best holdout: "
        + ", ".join(
            "never" if n is None else f"{n} ({1 - n / p[-1][0]:.0%} fewer)"
            for n, p in zip(per_seed, off, strict=True)
        )
    )


def prune_runs(args, results: Path) -> None:
    """Searches with pruning off and on, per space and seed; prints items and best holdout."""
    from evomerge.search.outcome import item_totals

    setting = json.loads(args.prune_setting) if args.prune_setting else True
    table: dict[tuple[str, str], list[dict]] = {}
    curves: dict[str, dict[str, list]] = {}
    for name in args.prune_spaces:
        space = space_file(name)
        name = space.stem
        for seed in args.prune_seeds:
            for mode in args.prune_modes:
                study = f"pr_{name}_{args.off_tag if mode == 'off' else args.prune_tag}_{seed}"
                if (results / study / "trials.csv").exists() and args.keep:
                    from evomerge.search.table import load_trials

                    wall, df = float("nan"), load_trials(results / study)
                else:
                    trials = args.on_trials if mode != "off" and args.on_trials else args.trials
                    wall, df = run(
                        space,
                        results,
                        trials=trials,
                        seed=seed,
                        study=study,
                        prune=False if mode == "off" else setting,
                        items=args.on_items if mode != "off" else None,
                        sampler=(args.off_sampler if mode == "off" else args.on_sampler) or None,
                    )
                curves.setdefault(name, {}).setdefault(mode, []).append(curve(df))
                if mode != "off" and args.on_trials:
                    df = df[
                        (df["baseline"] != "") | (df["number"] < args.trials)
                    ]  # the fixed-budget comparison: its first --trials trials
                n = item_totals(df)
                score, holdout = best_of(df)
                chosen_v, chosen_t = chosen_of(df)
                row = {
                    "seed": seed,
                    "items": n["trials"],
                    "all": n["all"],
                    "pruned": int(((df["state"] == "PRUNED") & (df["baseline"] == "")).sum()),
                    "score": score,
                    "holdout": holdout,
                    "chosen_v": chosen_v,
                    "chosen_t": chosen_t,
                    "wall": wall,
                }
                table.setdefault((name, mode), []).append(row)
                print(
                    f"  {name:15} seed {seed} prune {mode:3}: items {row['items']:5} (in all {row['all']:5}), {row['pruned']:2} pruned, "
                    f"best search {score:.3f} holdout {holdout:.3f}; chosen validation {chosen_v:.3f} test {chosen_t:.3f}  ({wall:.0f}s)",
                    flush=True,
                )
    print(
        f"\n== pruning off vs on ({setting}), {args.trials} trials, seeds {args.prune_seeds}: median [min, max]"
    )
    for name in (space_file(n).stem for n in args.prune_spaces):
        for mode in args.prune_modes:
            rows = table.get((name, mode), [])
            if rows:
                print(
                    f"  {name:15} {mode:3}: "
                    + "  ".join(
                        f"{k} {_spread([r[k] for r in rows], f)}"
                        for k, f in (
                            ("items", ".0f"),
                            ("all", ".0f"),
                            ("pruned", ".0f"),
                            ("holdout", ".3f"),
                            ("chosen_v", ".3f"),
                            ("chosen_t", ".3f"),
                            ("wall", ".0f"),
                        )
                    )
                )
        off, on = table.get((name, "off"), []), table.get((name, "on"), [])
        if off and on:
            cut = [1 - b["items"] / a["items"] for a, b in zip(off, on, strict=True)]
            cut_all = [1 - b["all"] / a["all"] for a, b in zip(off, on, strict=True)]
            dh = [b["holdout"] - a["holdout"] for a, b in zip(off, on, strict=True)]
            dt = [b["chosen_t"] - a["chosen_t"] for a, b in zip(off, on, strict=True)]
            print(
                f"  {name:15} on vs off, per seed: trial items cut {_spread(cut, '.1%')}, all items cut {_spread(cut_all, '.1%')}, "
                f"best holdout on - off {_spread(dh, '+.3f')}; median best holdout {statistics.median(r['holdout'] for r in on):.3f} (on) "
                f"vs {statistics.median(r['holdout'] for r in off):.3f} (off); chosen trial's test on - off {_spread(dt, '+.3f')}"
            )
        if off and on:
            equal_items(curves[name], 300)


def _spread(xs: list[float], fmt: str = ".3g") -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}, {format(max(xs), fmt)}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--compare-trials", type=int, default=24)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--prune", action="store_true", help="only the pruning comparison (part 3)")
    ap.add_argument("--prune-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--prune-spaces",
        nargs="+",
        default=list(PRUNE_SPACES),
        help="spaces: names under search_spaces/ (demo, demo_per_layer, demo_gen) or paths",
    )
    ap.add_argument("--prune-modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument(
        "--prune-setting",
        default="",
        help="search.prune for the 'on' runs, as JSON (default: true)",
    )
    ap.add_argument(
        "--prune-tag",
        default="on",
        help="study name part of the 'on' runs (several settings in one --keep folder)",
    )
    ap.add_argument(
        "--on-trials",
        type=int,
        default=0,
        help="trial budget of the runs with pruning (default: --trials); compared at equal items too",
    )
    ap.add_argument(
        "--on-items",
        type=int,
        default=0,
        help="search.items of the runs with pruning (an item budget; with --on-trials as the cap)",
    )
    ap.add_argument("--off-tag", default="off", help="study name part of the runs without pruning")
    ap.add_argument(
        "--on-sampler",
        default="",
        help="search.sampler of the runs with pruning (default: the space's)",
    )
    ap.add_argument(
        "--off-sampler",
        default="",
        help="search.sampler of the runs without pruning (default: the space's)",
    )
    ap.add_argument(
        "--simulate", action="store_true", help="replay stopping rules on the runs without pruning"
    )
    ap.add_argument("--keep", default="", help="results folder to keep (and reuse) the runs in")
    args = ap.parse_args()
    space = ROOT / "search_spaces" / "demo.yml"
    from evomerge.zoo import ensure_zoo

    t0 = time.perf_counter()
    ensure_zoo("demo")
    print(f"zoo ready in {time.perf_counter() - t0:.1f}s")
    if args.prune:
        with tempfile.TemporaryDirectory() as tmp:
            results = Path(args.keep or tmp)
            prune_runs(args, results)
            if args.simulate:
                from bench_prune_sim import simulate

                simulate(
                    results, tuple(space_file(n).stem for n in args.prune_spaces), args.prune_seeds
                )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        wall, df = run(space, results, trials=args.trials, seed=0, study="bench_demo")
        t = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
        share = (t["merge_s"] / t["wall_s"]).median()
        print(
            f"\n== demo search: {len(t)} trials in {wall:.1f}s ({wall / 60:.1f} min, incl. {int((df['baseline'] != '').sum())} baselines and holdout re-scores)"
        )
        print(
            f"per trial (median): wall {t['wall_s'].median():.2f}s  merge {t['merge_s'].median():.3f}s  eval {t['eval_s'].median():.2f}s"
        )
        ratio = t["merge_s"] / t["wall_s"]
        worst = t.loc[ratio.idxmax()]
        print(
            f"merge share of trial wall time: median {share:.1%}, 90th percentile {ratio.quantile(0.9):.1%}, "
            f"max {ratio.max():.1%} (trial #{worst['number']}: merge {worst['merge_s']:.3f}s of {worst['wall_s']:.2f}s) (target <= 10%)"
        )
        print(
            f"totals: merge {t['merge_s'].sum():.1f}s = {t['merge_s'].sum() / t['wall_s'].sum():.1%} of trial wall time"
        )
        best = t.sort_values("score", ascending=False).iloc[0]
        base = df[df["baseline"] != ""].set_index("baseline")
        print(
            f"best trial by search #{best['number']}: search {best['score']:.3f}, validation {best['validation']:.3f}"
        )
        for name, r in base.iterrows():
            print(f"  baseline {name:<24} search {r['score']:.3f}  test {r['test']:.3f}")
        if args.skip_compare:
            return 0
        print(f"\n== TPE vs random, {args.compare_trials} trials, seeds {args.seeds}")
        summary: dict[str, list[float]] = {}
        for sampler in ("tpe", "random"):
            for seed in args.seeds:
                wall, df = run(
                    space,
                    results,
                    trials=args.compare_trials,
                    seed=seed,
                    sampler=sampler,
                    study=f"cmp_{sampler}_{seed}",
                )
                t = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
                best = t.sort_values("score", ascending=False).iloc[0]
                summary.setdefault(sampler, []).append(float(best["validation"]))
                print(
                    f"  {sampler:6} seed {seed}: best search {best['score']:.3f}  its validation {best['validation']:.3f}  ({wall:.0f}s)"
                )
        for sampler, vals in summary.items():
            print(
                f"  {sampler:6} median best holdout over {len(vals)} seeds: {statistics.median(vals):.3f}"
            )
        print(
            f"  TPE - random (median): {statistics.median(summary['tpe']) - statistics.median(summary['random']):+.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

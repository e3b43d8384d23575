"""How much a score chosen on the items that report it overstates the chosen model, on the demo.

For each seed, ``search_spaces/demo.yml`` is searched as a user runs it (40 trials, pruning on):
the finalists are re-scored on the validation items and the chosen trial (best validation score)
on the test items. This bench then scores every re-scored trial on the test items too (analysis
only: a search never does), and prints per seed:

- the chosen trial's validation score (what choosing and reporting on the same items reports: a
  maximum over the re-scored trials) and its test score (items that chose nothing);
- the old rule, best holdout among finalists on all holdout items (validation and test together),
  and the score it reported (its own items chose it, so no item is left to check it on);
- the trial choosing by search score alone would give, with its test score.

The mean of (reported - test) over seeds is the optimism of a score that chose; choosing on
validation rather than search score is judged by the test scores of what each picks.

Usage: python bench/bench_honest.py [--seeds 0 1 2 3 4 5 6 7 8 9] [--trials 40] [--keep DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def one_seed(results: Path, seed: int, trials: int) -> dict[str, float]:
    from evomerge.search.loop import Search
    from evomerge.search.setup import prepare
    from evomerge.search.table import chosen_row, trials_frame

    setup = prepare(
        ROOT / "search_spaces" / "demo.yml",
        trials=trials,
        seed=seed,
        study=f"honest_{seed}",
        results_dir=results,
        log=lambda m: None,
    )
    search = Search(setup, quiet=True)
    out = search.run()
    records = search.open_study()
    df = trials_frame(records.study)
    rescored = df[(df["baseline"] == "") & df["validation"].notna()].copy()
    # every re-scored trial on the test items (the search itself scores only the chosen one)
    tests = {}
    for _, r in rescored.iterrows():
        rec = records.trial(records.study.trials[int(r["number"])])
        model, _ = search.candidates.materialize(yaml.safe_load(rec.recipe), "bench")
        tests[int(r["number"])] = search.candidates.score(model, "test")
    rescored["t"] = [tests[int(n)].aggregate for n in rescored["number"]]
    nv, nt = rescored["validation_items"].iloc[0], tests[int(rescored["number"].iloc[0])].n_items
    # the old rule: the best score on all holdout items (validation and test) among finalists
    rescored["h"] = (rescored["validation"] * nv + rescored["t"] * nt) / (nv + nt)
    old = rescored.sort_values(["h", "score"], ascending=False).iloc[0]
    chosen = chosen_row(df)
    done = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
    by_search = done.sort_values(["score", "number"], ascending=[False, True]).iloc[0]
    n = int(chosen["number"])
    assert abs(tests[n].aggregate - float(chosen["test"])) < 1e-9, "test score not reproduced"
    return {
        "seed": seed,
        "rescored": len(rescored),
        "chosen": n,
        "chosen_val": float(chosen["validation"]),
        "chosen_test": float(chosen["test"]),
        "old": int(old["number"]),
        "old_reported": float(old["h"]),
        "old_test": float(old["t"]),
        "search_pick": int(by_search["number"]),
        "search_pick_test": float(
            tests[int(by_search["number"])].aggregate
            if int(by_search["number"]) in tests
            else float("nan")
        ),
        "wall": out.seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--keep", type=Path, default=None, help="results folder to keep")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        results = args.keep or Path(tmp)
        rows = []
        for seed in args.seeds:
            r = one_seed(results, seed, args.trials)
            rows.append(r)
            print(
                f"seed {seed}: {r['rescored']} re-scored; chosen #{r['chosen']} validation "
                f"{r['chosen_val']:.3f} test {r['chosen_test']:.3f}; old rule #{r['old']} reported "
                f"{r['old_reported']:.3f} test {r['old_test']:.3f}; by search #{r['search_pick']} test "
                f"{r['search_pick_test']:.3f}  ({r['wall']:.0f}s)",
                flush=True,
            )
    mean = statistics.mean
    gap = [r["chosen_val"] - r["chosen_test"] for r in rows]
    print(f"\n== {len(rows)} seeds, demo.yml, {args.trials} trials")
    print(
        f"chosen on validation: validation {mean(r['chosen_val'] for r in rows):.3f}, test "
        f"{mean(r['chosen_test'] for r in rows):.3f}: a score that chose overstates by "
        f"{mean(gap):+.3f} on average (median {statistics.median(gap):+.3f}; higher on "
        f"{sum(g > 0 for g in gap)} of {len(gap)} seeds)"
    )
    print(
        f"old rule (the best of the re-scored trials on all holdout items, reported as is): "
        f"{mean(r['old_reported'] for r in rows):.3f} on average, against {mean(r['chosen_test'] for r in rows):.3f} "
        f"now reported on items that chose nothing; it exported another trial on "
        f"{sum(r['old'] != r['chosen'] for r in rows)} of {len(rows)} seeds"
    )
    picks = [r for r in rows if r["search_pick_test"] == r["search_pick_test"]]
    print(
        f"test score of the pick: validation {mean(r['chosen_test'] for r in picks):.3f} vs search score "
        f"{mean(r['search_pick_test'] for r in picks):.3f} over the {len(picks)} seeds where the best "
        f"by search was re-scored (same pick on {sum(r['search_pick'] == r['chosen'] for r in picks)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

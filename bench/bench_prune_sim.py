"""Replaying rules of stopping candidates early on searches that ran without pruning (issue 12).

A study run with ``prune: false`` keeps every trial's per-item values on the search items. Replaying
a rule on them, trial by trial in the order they ran, says what the rule would have stopped: each
trial is compared, round by round, with the trials before it that the rule kept. The replay cannot
show how stopping changes what the sampler proposes next (the real runs of ``bench_search.py
--prune`` do); it shows the items saved, the wrong stops (a stopped trial whose full score tied or
beat its reference) and whether the run's best trial would have been kept.

Rules: ``paired`` is evomerge's (:mod:`evomerge.search.pruning`: a one-sided bound on the paired
difference with the finite-population correction) at several ``alpha`` and ``against``;
``wilcoxon`` is Optuna's ``WilcoxonPruner`` rule (a one-sided Wilcoxon signed-rank test against the
best trial, ``zero_method="zsplit"``, not stopping a trial whose mean beats the best's on the same
items) at ``p_threshold``; ``halving`` is an unpaired successive-halving rule: stop when the partial
score is below the top ``1/eta`` of the partial scores of earlier trials after the same round.

Usage: imported by ``bench_search.py --prune --simulate``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from evomerge.evaluation.base import TaskSpec, item_weights
from evomerge.search.pruning import Pruner
from evomerge.space.prune import PruneSettings

ROUNDS = ((0.1, 0.25, 1.0), (0.25, 0.5, 1.0), (0.1, 0.25, 0.5, 1.0), (0.1, 0.2, 0.4, 1.0))


@dataclass
class Trial:
    number: int
    score: float
    values: dict[str, list[float]]
    holdout: float


def load_trials_of(results: Path, study: str) -> list[Trial]:
    import optuna
    from optuna.trial import TrialState

    from evomerge.search.records import StudyRecords

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(study_name=study, storage=f"sqlite:///{results / study / 'study.db'}")
    records = StudyRecords(st)
    out = []
    for t in st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        s = records.trial(t).search
        h = records.rescore(t.number, "validation")
        if s is not None and s.values:
            out.append(
                Trial(
                    t.number,
                    s.aggregate,
                    {k: [float(x) for x in v] for k, v in s.values.items()},
                    h.aggregate if h else math.nan,
                )
            )
    return sorted(out, key=lambda t: t.number)


def _seen(t: Trial, items: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    return {k: {i: t.values[k][i] for i in idx} for k, idx in items.items()}


def _partial(seen: dict[str, dict[int, float]], weights: dict[str, float]) -> float:
    d = [weights[k] * v for k, vals in seen.items() for v in vals.values()]
    return math.fsum(d) / len(d)


def replay(trials: list[Trial], rule: tuple, rounds: tuple[float, ...]) -> dict:
    """What ``rule`` would have stopped in one run (see the module docstring)."""
    counts = {k: len(v) for k, v in trials[0].values.items()}
    weights = item_weights([TaskSpec(k) for k in counts], counts)
    kind = rule[0]
    pruner = Pruner(
        PruneSettings(
            rounds, rule[2] if kind == "paired" else 1, rule[1] if kind == "paired" else 0.05
        ),
        counts,
        weights,
    )
    cum, acc = [], {k: [] for k in counts}
    for step in pruner.rounds()[:-1]:
        for k, idx in step.items():
            acc[k] = acc[k] + idx
        cum.append({k: list(v) for k, v in acc.items()})
    total = sum(counts.values())
    kept: list[Trial] = []
    rungs: list[list[float]] = [[] for _ in cum]
    items = wrong = stopped = 0
    for t in trials:
        ref = _reference(kept, rule)
        cut = None
        for r, its in enumerate(cum):
            seen = _seen(t, its)
            part = _partial(seen, weights)
            stop = ref is not None and _stops(rule, pruner, seen, ref, part, rungs[r], weights)
            rungs[r].append(part)
            if stop:
                cut = r
                break
        if cut is None:
            items += total
            kept.append(t)
        else:
            items += sum(len(v) for v in cum[cut].values())
            stopped += 1
            wrong += t.score >= ref.score
    best = max(kept, key=lambda x: (x.score, -x.number))
    full_best = max(trials, key=lambda x: (x.score, -x.number))
    return {
        "items": items,
        "full": total * len(trials),
        "stopped": stopped,
        "wrong": wrong,
        "best_kept": best.number == full_best.number,
        "holdout": best.holdout,
        "score": best.score,
    }


def _reference(kept: list[Trial], rule: tuple) -> Trial | None:
    k = rule[2] if rule[0] == "paired" else 1
    ranked = sorted(kept, key=lambda x: (x.score, -x.number), reverse=True)
    return ranked[k - 1] if len(ranked) >= k else None


def _stops(
    rule: tuple,
    pruner: Pruner,
    seen: dict,
    ref: Trial,
    part: float,
    rung: list[float],
    weights: dict,
) -> bool:
    kind = rule[0]
    if kind == "paired":
        return pruner.hopeless(seen, ref.values)
    if kind == "wilcoxon":
        from scipy import stats

        d = [
            weights[k] * (v - ref.values[k][i]) for k, vals in seen.items() for i, v in vals.items()
        ]
        if len(d) < 2 or all(x == 0 for x in d):
            return False
        if math.fsum(d) >= 0:  # Optuna's safety: the trial's mean beats the best's on these items
            return False
        return bool(stats.wilcoxon(d, alternative="less", zero_method="zsplit").pvalue < rule[1])
    if kind == "halving":
        if len(rung) < rule[1]:
            return False
        top = sorted(rung, reverse=True)[max(0, math.ceil(len(rung) / rule[1]) - 1)]
        return part < top
    raise ValueError(kind)


def simulate(results: Path, spaces: tuple[str, ...], seeds: list[int]) -> None:
    """Print, per space, each rule's replay over the seeds' runs without pruning."""
    rules = (
        [("paired", a, k) for a in (0.01, 0.05, 0.1, 0.2, 0.3) for k in (1, 3)]
        + [("wilcoxon", p) for p in (0.01, 0.1)]
        + [("halving", e) for e in (2, 3)]
    )
    for name in spaces:
        runs = [load_trials_of(results, f"pr_{name}_off_{s}") for s in seeds]
        runs = [r for r in runs if r]
        if not runs:
            continue
        print(
            f"\n== replay on {name}, {len(runs)} runs without pruning ({len(runs[0])} trials each): "
            "items cut median [min, max], wrong stops / stops, runs that keep their best trial, median best holdout"
        )
        for rounds in ROUNDS:
            for rule in rules:
                got = [replay(r, rule, rounds) for r in runs]
                cut = [1 - g["items"] / g["full"] for g in got]
                hold = [g["holdout"] for g in got if g["holdout"] == g["holdout"]]
                print(
                    f"  rounds {str(list(rounds)):22} {str(rule):24} cut {statistics.median(cut):6.1%} [{min(cut):.1%}, {max(cut):.1%}]  "
                    f"wrong {sum(g['wrong'] for g in got):3}/{sum(g['stopped'] for g in got):3}  best kept {sum(g['best_kept'] for g in got)}/{len(got)}  "
                    f"holdout {statistics.median(hold) if hold else float('nan'):.3f}"
                )

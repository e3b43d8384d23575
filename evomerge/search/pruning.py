"""Stopping hopeless candidates early: rounds of search items and a paired test (``search.prune``).

Every candidate is scored on the same search items, so two candidates can be compared item by item.
A candidate is scored in rounds (``prune.rounds``: shares of each task's items, in a seeded order
that is the same for every candidate, every worker and every resume); after each round but the last
it is compared with the reference, the ``prune.against``-th best finished trial, on the items
scored so far, and stopped when it cannot beat it. A candidate that is never stopped is scored on
every item: its score is the one an evaluation without pruning gives (the rounds' union is the
full item set, and the evaluator computes the full result itself, see
:class:`~evomerge.evaluation.base.StagedEvaluation`).

The rule: with ``n`` of the ``N`` search items scored, ``d_i`` is the candidate's value of item
``i`` minus the reference's, each times its task's share (:func:`~evomerge.evaluation.base.item_weights`,
so that the mean over all ``N`` items is the difference of the aggregate scores, ``D``). The items
scored so far are a uniform random sample of all ``N`` without replacement, so their mean ``d̄``
estimates ``D`` with standard error ``s / sqrt(n) * sqrt(1 - n / N)``. The candidate is stopped when
``d̄ + z(1 - alpha) * se < 0``: the upper one-sided confidence bound of its full-score difference is
below zero. By the normal approximation, a candidate whose full score ties or beats the reference is
stopped with probability at most ``alpha`` per round (``(rounds - 1) * alpha`` in all).

A stopped trial is told to Optuna as PRUNED, its record holding the partial scores (per-item values
of the items scored, ``n_items`` of them): it is no finalist, never a reference, and the digest
reuse (:meth:`~evomerge.search.records.StudyRecords.scored`) never hands its partial score on.

Its record also holds the estimate of its full score: the reference's full score plus ``d̄`` (a
paired estimate; the partial score alone is not one, the first items may be easier or harder than
the rest). The sampler sees a stopped trial at that estimate
(:class:`~evomerge.search.samplers.StoppedAsEstimated`), so a candidate stopped just short of the
best still counts among the good points TPE samples around, where Optuna would rank every PRUNED
trial below every finished one.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from optuna.trial import TrialState

from evomerge.evaluation.base import Evaluator, item_weights
from evomerge.search.candidates import Candidates
from evomerge.search.records import Scores, StudyRecords
from evomerge.space.prune import PruneSettings

__all__ = ["Pruner", "RoundScorer"]

Values = Mapping[str, Mapping[int, float]]


class Pruner:
    """The rounds and the paired rule for one set of search tasks (see the module docstring).

    Args:
        settings: ``search.prune``.
        counts: search items per task.
        weights: each task's item factor (:func:`~evomerge.evaluation.base.item_weights`).

    Example:
        >>> p = Pruner(PruneSettings(rounds=(0.5, 1.0)), {"a": 4}, {"a": 1.0})
        >>> [sorted(r["a"]) for r in p.rounds()]
        [[0, 3], [1, 2]]
        >>> p.hopeless({"a": {0: 0.0, 3: 0.0}}, {"a": [1.0, 1.0, 1.0, 1.0]})
        True
    """

    def __init__(
        self, settings: PruneSettings, counts: Mapping[str, int], weights: Mapping[str, float]
    ) -> None:
        self.settings = settings
        self.counts = dict(counts)
        self.weights = dict(weights)
        self.total = sum(self.counts.values())
        self.z = statistics.NormalDist().inv_cdf(1 - settings.alpha)
        self.order: dict[str, list[int]] = {}
        for task, n in self.counts.items():
            order = list(range(n))
            random.Random(f"evomerge-prune:{task}").shuffle(order)
            self.order[task] = order

    def rounds(self) -> list[dict[str, list[int]]]:
        """The items each round adds, per task; the last round adds every item left."""
        out, done = [], dict.fromkeys(self.counts, 0)
        for share in self.settings.rounds:
            step = {}
            for task, n in self.counts.items():
                cut = n if share >= 1 else min(n, max(1, math.ceil(share * n)))
                step[task], done[task] = self.order[task][done[task] : cut], max(cut, done[task])
            out.append(step)
        return out

    def difference(
        self, seen: Values, reference: Mapping[str, Sequence[float | None]]
    ) -> tuple[float, float]:
        """The paired estimate of the candidate's full score minus the reference's, from its values
        ``seen`` and the reference's value of every item (per task), with its standard error (0
        with fewer than two items, or every item scored)."""
        d = [
            self.weights[t] * (v - float(reference[t][i] or 0.0))
            for t, vals in seen.items()
            for i, v in vals.items()
        ]
        n = len(d)
        if n < 2 or n >= self.total:
            return (math.fsum(d) / n if d else 0.0), 0.0
        return math.fsum(d) / n, statistics.stdev(d) / math.sqrt(n) * math.sqrt(1 - n / self.total)

    def hopeless(self, seen: Values, reference: Mapping[str, Sequence[float | None]]) -> bool:
        """Whether the candidate's values ``seen`` say it cannot beat ``reference`` (every item's
        value, per task): the paired rule of the module docstring."""
        n = sum(len(v) for v in seen.values())
        if n < 2 or n >= self.total:
            return False
        mean, se = self.difference(seen, reference)
        return mean + self.z * se < 0

    def partial(self, seen: Values, seconds: float) -> Scores:
        """The scores of the items scored so far (each task's mean, aggregated with its weight)."""
        scores, stderr = {}, {}
        for t, vals in seen.items():
            x = list(vals.values())
            scores[t] = math.fsum(x) / len(x) if x else math.nan
            stderr[t] = statistics.stdev(x) / math.sqrt(len(x)) if len(x) > 1 else 0.0
        # each task's share of the aggregate: weight / sum(weights)
        share = {t: self.weights[t] * self.counts[t] / self.total for t in seen}
        agg = math.fsum(share[t] * scores[t] for t in seen)
        se = math.sqrt(math.fsum((share[t] * stderr[t]) ** 2 for t in seen))
        values = {t: [seen[t].get(i) for i in range(self.counts[t])] for t in seen}
        return Scores(scores, stderr, agg, se, seconds, sum(len(v) for v in seen.values()), values)


class RoundScorer:
    """Scores a searched trial on the search items, in rounds when pruning is on.

    Args:
        settings: ``search.prune`` (None: off).
        candidates: merges and scores.
        log: where to say that pruning is off because the evaluator cannot do it.
    """

    def __init__(
        self, settings: PruneSettings | None, candidates: Candidates, log: Callable[[str], None]
    ) -> None:
        self.candidates = candidates
        self.pruner: Pruner | None = None
        self._reference: tuple[int, Scores | None] = (-1, None)  # (complete trials, reference)
        ev: Evaluator = candidates.evaluator
        counts = ev.item_counts() if settings is not None else {}
        if settings is not None and not counts:
            log(
                "pruning is off: the evaluator cannot score the search items a subset at a time "
                "(every task's metric must be a mean over items, such as acc or exact_match)"
            )
        elif settings is not None:
            self.pruner = Pruner(settings, counts, item_weights(ev.specs(), counts))

    def reference(self, records: StudyRecords) -> Scores | None:
        """The search scores (per-item values included) of the ``against``-th best COMPLETE trial,
        or None (too few yet). A complete trial never changes, so the reference is read again only
        when their number grew."""
        if self.pruner is None:
            return None
        complete = records.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if self._reference[0] == len(complete):
            return self._reference[1]
        done = []
        for t in complete:
            s = records.trial(t).search
            if s is not None and s.complete(self.pruner.counts):
                done.append((s.aggregate, -t.number, s))
        done.sort(key=lambda x: (x[0], x[1]), reverse=True)
        k = self.pruner.settings.against
        ref = done[k - 1][2] if len(done) >= k else None
        self._reference = (len(complete), ref)
        return ref

    def score(
        self,
        model: torch.nn.Module,
        records: StudyRecords,
        report: Callable[[float, int], None],
        *,
        prunable: bool = True,
    ) -> tuple[Scores, float | None]:
        """Score ``model`` on the search items.

        Args:
            model: the merged candidate.
            records: the study's records (the reference is read afresh after every round, so
                other workers' finished trials count).
            report: called with (partial score, items scored) after each round but the last.
            prunable: False scores every item at once (hand recipes are never stopped).

        Returns:
            (scores, estimate): the full scores and None, or for a stopped candidate its partial
            scores and the estimate of its full score (the reference's plus the paired difference).
        """
        p = self.pruner
        if p is None or not prunable or self.reference(records) is None:
            return self.candidates.score(model, "search"), None
        staged = self.candidates.evaluator.staged(model)
        if staged is None:
            return self.candidates.score(model, "search"), None
        t0 = time.perf_counter()
        seen: dict[str, dict[int, float]] = {t: {} for t in p.counts}
        for items in p.rounds()[:-1]:
            if not any(items.values()):  # a share too small to add an item to any task
                continue
            for t, vals in staged.score(items).items():
                seen[t].update(vals)
            partial = p.partial(seen, time.perf_counter() - t0)
            report(partial.aggregate, partial.n_items)
            ref = self.reference(records)
            if ref is not None and p.hopeless(seen, ref.values):
                return partial, ref.aggregate + p.difference(seen, ref.values)[0]
        return staged.result().checked(), None

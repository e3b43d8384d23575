"""A deterministic stand-in for lm-eval, for fast search tests (shipped, like lm-eval's dummy LM)."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from evomerge.evaluation.base import (
    VALIDATION,
    Evaluator,
    Scores,
    StagedEvaluation,
    TaskSpec,
    digest_of,
    make_scores,
    split_holdout,
)

__all__ = ["FakeEvaluator", "layer_stats"]

# (model, split) -> each search task's smooth score in [-1, 1] on that split.
ScoreFn = Callable[[torch.nn.Module, str], Mapping[str, float]]


def layer_stats(model: torch.nn.Module) -> torch.Tensor:
    """Mean parameter value of each decoder layer (``layers.<i>.`` in the parameter name)."""
    sums: dict[int, list[float]] = {}
    for name, p in model.named_parameters():
        m = re.search(r"layers\.(\d+)\.", name)
        if m:
            s = sums.setdefault(int(m.group(1)), [0.0, 0.0])
            s[0] += float(p.detach().double().sum())
            s[1] += p.numel()
    return torch.tensor([sums[i][0] / sums[i][1] for i in sorted(sums)], dtype=torch.float64)


class FakeEvaluator(Evaluator):
    """A deterministic stand-in for lm-eval: scores a model from its tensors alone, in milliseconds.

    ``score(model, split)`` gives each search task's *smooth* score on a split (the holdout tasks
    are the search tasks' twins, named ``<task>_holdout``; a split may shift or scale the
    function, as other items of the same tasks would). Without ``items`` that smooth score is the
    task's score. With ``items=n`` each task has ``n`` items, as lm-eval's tasks do: item ``j``
    has a difficulty ``u_j``, the numbers ``(0.5 .. n-0.5) / n`` in a seeded order, and is right
    (1.0) when ``u_j`` is below the smooth score, else wrong (0.0); the task's score is the mean of
    its items. It can then score the search items a subset at a time (:meth:`staged`), and counts
    every item it scores in ``items_scored``. Each holdout task has ``n`` items too, split into
    validation and test items as lm-eval's holdout is
    (:func:`~evomerge.evaluation.base.split_holdout`).

    :meth:`layer_targets` builds the usual one: a smooth landscape over the layers' mean weights
    with one optimum per task, so that a search has something real to climb.

    Args:
        tasks: the search tasks' names.
        score: the smooth scores, see above.
        items: items per task (None: one smooth score per task, no items).
        validation: the share of holdout items that are validation items (0: none).
        before: called as ``before(model, split)`` at the start of every evaluation (tests use it
            to wait, to leave a marker or to fail).
        fingerprint: what else ``score`` depends on, for :meth:`digest`.

    Example:
        >>> ev = FakeEvaluator(["a"], lambda m, split: {"a": 0.5})
        >>> ev.task_names("test"), ev.evaluate(torch.nn.Linear(1, 1), "test").aggregate
        (['a_holdout'], 0.5)
    """

    def __init__(
        self,
        tasks: Sequence[str],
        score: ScoreFn,
        *,
        items: int | None = None,
        validation: float = VALIDATION,
        before: Callable[[torch.nn.Module, str], None] | None = None,
        fingerprint: object = None,
    ) -> None:
        self.tasks, self.score, self.n = list(tasks), score, items
        self.validation, self.before, self.fingerprint = validation, before, fingerprint
        self.calls = self.items_scored = 0
        every = list(range(items or 0))
        val, test = split_holdout(every, validation)
        self._ids = {"search": every, "holdout": every, "validation": val, "test": test}
        self._difficulty: dict[str, list[float]] = {}
        for k in self.tasks:
            order = list(every)
            random.Random(f"fake-items:{k}").shuffle(order)
            self._difficulty[k] = [(j + 0.5) / len(order) for j in order]

    @classmethod
    def layer_targets(
        cls,
        targets: Mapping[str, Sequence[float]],
        *,
        width: float = 1e-3,
        holdout_shift: float = 0.0,
        items: int | None = None,
        validation: float = VALIDATION,
    ) -> FakeEvaluator:
        """Task ``k`` scores ``exp(-sum_l (stat_l - target_kl)^2 / width)``, ``stat_l`` the mean
        parameter of layer ``l`` (:func:`layer_stats`); on the holdout the targets shift by
        ``holdout_shift`` (a slightly different optimum).

        Raises:
            ValueError: (when scoring) a model with another number of layers than targets.
        """
        tensors = {k: torch.tensor(list(v), dtype=torch.float64) for k, v in targets.items()}

        def score(model: torch.nn.Module, split: str) -> dict[str, float]:
            stats = layer_stats(model)
            shift = holdout_shift if split != "search" else 0.0
            out = {}
            for name, target in tensors.items():
                if target.numel() != stats.numel():
                    raise ValueError(
                        f"FakeEvaluator: {target.numel()} targets for {stats.numel()} layers"
                    )
                out[name] = math.exp(-float(((stats - target - shift) ** 2).sum()) / width)
            return out

        fingerprint = [sorted((k, list(v)) for k, v in targets.items()), width, holdout_shift]
        return cls(
            list(targets), score, items=items, validation=validation, fingerprint=fingerprint
        )

    def task_names(self, split: str = "search") -> list[str]:
        if split == "validation" and self.validation == 0:
            return []
        return list(self.tasks) if split == "search" else [f"{k}_holdout" for k in self.tasks]

    def digest(self) -> str:
        return digest_of([self.tasks, self.n, self.validation, self.fingerprint])

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> Scores:
        return _FakeStaged(self, model, split).result()

    def item_counts(self) -> dict[str, int]:
        return dict.fromkeys(self.tasks, self.n) if self.n else {}

    def staged(self, model: torch.nn.Module) -> StagedEvaluation | None:
        return _FakeStaged(self, model) if self.n else None


class _FakeStaged(StagedEvaluation):
    """One evaluation of ``split``: items (doc ids of :attr:`FakeEvaluator._ids`) scored once
    each, as asked or all at :meth:`result`; without items, the smooth scores."""

    def __init__(self, ev: FakeEvaluator, model: torch.nn.Module, split: str = "search") -> None:
        self.ev, self.split = ev, split
        ev.calls += 1
        if ev.before is not None:
            ev.before(model, split)
        got = ev.score(model, split)  # each task's smooth score, by its name in ``split``
        self.smooth = {
            n: float(got[k]) for n, k in zip(ev.task_names(split), ev.tasks, strict=True)
        }
        self.values: dict[str, dict[int, float]] = {k: {} for k in self.smooth}

    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
        for task, idx in items.items():
            order = self.ev._difficulty[task.removesuffix("_holdout")]
            for i in idx:
                if i not in self.values[task]:
                    self.values[task][i] = 1.0 if order[i] < self.smooth[task] else 0.0
                    self.ev.items_scored += 1
        return {task: {i: self.values[task][i] for i in idx} for task, idx in items.items()}

    def result(self) -> Scores:
        """The scores: per-task means of the items' values when there are items, else the
        smooth scores."""
        t0 = time.perf_counter()
        specs = [TaskSpec(k) for k in self.smooth]
        if not self.ev.n:
            stderr = dict.fromkeys(self.smooth, 0.01)
            seconds = time.perf_counter() - t0
            return make_scores(specs, dict(self.smooth), stderr, seconds, None, 100 * len(specs))
        ids = self.ev._ids[self.split]
        self.score({k: ids for k in self.values})
        values = {k: [v[i] for i in ids] for k, v in self.values.items()}
        scores = {k: sum(v) / len(v) for k, v in values.items()}
        stderr = {
            k: math.sqrt(p * (1 - p) / (len(values[k]) - 1)) if len(values[k]) > 1 else 0.0
            for k, p in scores.items()
        }
        return make_scores(specs, scores, stderr, time.perf_counter() - t0, values)

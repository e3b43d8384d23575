"""A deterministic stand-in for lm-eval, for fast search tests (shipped, like lm-eval's dummy LM)."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Mapping, Sequence

import torch

from evomerge.evaluation.base import (
    VALIDATION,
    EvalResult,
    Evaluator,
    StagedEvaluation,
    TaskSpec,
    aggregate,
    digest_of,
    split_holdout,
)

__all__ = ["FakeEvaluator"]


class FakeEvaluator(Evaluator):
    """A deterministic stand-in for lm-eval: scores a model from its tensors alone, in milliseconds.

    Each task ``k`` has a target value per decoder layer; a layer's statistic is the mean of its
    parameters, and the task's score is ``exp(-sum_l (stat_l - target_kl)^2 / width)``: a smooth
    landscape with one optimum per task, so a search has something real to climb. The holdout score
    (validation and test) is the same function with targets shifted by ``holdout_shift`` (a slightly
    different optimum).

    With ``items=n`` each task has ``n`` items instead, as lm-eval's tasks do: item ``j`` has a
    difficulty ``u_j``, the numbers ``(0.5 .. n-0.5) / n`` in a seeded order, and is right (1.0)
    when ``u_j`` is below the smooth score, else wrong (0.0); the task's score is the mean of its
    items (the smooth score rounded down to a multiple of ``1/n``). It can then score the search
    items a subset at a time (:meth:`staged`), and counts every item it scores in ``items_scored``.
    Each holdout task has ``n`` items too, split into validation and test items by ``validation``
    as lm-eval's holdout is (:func:`~evomerge.evaluation.base.split_holdout`).

    Args:
        targets: task name -> per-layer target statistics (length = number of layers).
        width: how quickly the score falls off.
        holdout_shift: added to every target for the holdout split.
        items: items per task (None: one smooth score per task, no items).
        validation: the share of holdout items that are validation items.
    """

    def __init__(
        self,
        targets: Mapping[str, list[float]],
        *,
        width: float = 1e-3,
        holdout_shift: float = 0.0,
        items: int | None = None,
        validation: float = VALIDATION,
    ) -> None:
        self.targets = {k: torch.tensor(v, dtype=torch.float64) for k, v in targets.items()}
        self.width = width
        self.holdout_shift = holdout_shift
        self.n = items
        self.validation = validation
        val, test = split_holdout(range(items or 0), validation)
        self._split_items = {"search": list(range(items or 0)), "holdout": list(range(items or 0))}
        self._split_items.update(validation=val, test=test)
        self.items_scored = 0
        self._difficulty: dict[str, list[float]] = {}
        for k in self.targets:
            order = list(range(items or 0))
            random.Random(f"fake-items:{k}").shuffle(order)
            self._difficulty[k] = [(j + 0.5) / len(order) for j in order]

    @staticmethod
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

    def task_names(self, split: str = "search") -> list[str]:
        if split == "validation" and self.validation == 0:
            return []
        return list(self.targets) if split == "search" else [f"{k}_holdout" for k in self.targets]

    def digest(self) -> str:
        return digest_of(
            [sorted((k, v.tolist()) for k, v in self.targets.items()), self.width]
            + [self.holdout_shift, self.n, self.validation]
        )

    def smooth(self, model: torch.nn.Module, split: str = "search") -> dict[str, float]:
        """The smooth score of each task of ``split`` (before items)."""
        stats = self.layer_stats(model)
        shift = self.holdout_shift if split != "search" else 0.0
        out = {}
        for name, target in zip(self.task_names(split), self.targets.values(), strict=False):
            if target.numel() != stats.numel():
                raise ValueError(
                    f"FakeEvaluator: {target.numel()} targets for {stats.numel()} layers"
                )
            out[name] = math.exp(-float(((stats - target - shift) ** 2).sum()) / self.width)
        return out

    def item_value(self, task: str, index: int, smooth: float) -> float:
        """Item ``index`` of search task ``task`` (or its holdout twin) at smooth score ``smooth``."""
        return 1.0 if self._difficulty[task.removesuffix("_holdout")][index] < smooth else 0.0

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        t0 = time.perf_counter()
        smooth = self.smooth(model, split)
        values = None
        if self.n:
            ids = self._split_items[split]
            values = {k: [self.item_value(k, j, v) for j in ids] for k, v in smooth.items()}
            self.items_scored += len(ids) * len(values)
        return self.assemble(smooth, values, t0)

    @staticmethod
    def assemble(
        smooth: Mapping[str, float], values: Mapping[str, list[float]] | None, t0: float
    ) -> EvalResult:
        """The result: per-task means of ``values`` when given, else the smooth scores."""
        scores, stderr, n = {}, {}, {}
        items: dict[str, list[float | None]] = {}
        for name, value in smooth.items():
            if values is not None:
                vals = values[name]
                p = sum(vals) / len(vals)
                items[name], scores[name], n[name] = list(vals), p, len(vals)
                stderr[name] = math.sqrt(p * (1 - p) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            else:
                scores[name], stderr[name], n[name] = value, 0.01, 100
        specs = [TaskSpec(k) for k in scores]
        agg, se = aggregate(specs, scores, stderr)
        return EvalResult(scores, stderr, agg, se, time.perf_counter() - t0, n, items)

    def item_counts(self) -> dict[str, int]:
        return {k: self.n for k in self.targets} if self.n else {}

    def staged(self, model: torch.nn.Module) -> StagedEvaluation | None:
        return _FakeStaged(self, model) if self.n else None


class _FakeStaged(StagedEvaluation):
    def __init__(self, ev: FakeEvaluator, model: torch.nn.Module) -> None:
        self.ev, self.model = ev, model
        self.smooth = ev.smooth(model)
        self.values: dict[str, dict[int, float]] = {k: {} for k in self.smooth}

    @property
    def scored(self) -> int:
        return sum(len(v) for v in self.values.values())

    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
        for task, idx in items.items():
            for i in idx:
                if i not in self.values[task]:
                    self.values[task][i] = self.ev.item_value(task, i, self.smooth[task])
                    self.ev.items_scored += 1
        return {task: {i: self.values[task][i] for i in idx} for task, idx in items.items()}

    def result(self) -> EvalResult:
        t0 = time.perf_counter()
        n = self.ev.n or 0
        self.score({k: range(n) for k in self.values})
        return self.ev.assemble(
            self.smooth, {k: [v[i] for i in range(n)] for k, v in self.values.items()}, t0
        )

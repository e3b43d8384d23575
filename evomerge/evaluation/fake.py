"""A deterministic stand-in for lm-eval, for fast search tests (shipped, like lm-eval's dummy LM)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping

import torch

from evomerge.evaluation.base import EvalResult, Evaluator, TaskSpec, aggregate

__all__ = ["FakeEvaluator"]


class FakeEvaluator(Evaluator):
    """A deterministic stand-in for lm-eval: scores a model from its tensors alone, in milliseconds.

    Each task ``k`` has a target value per decoder layer; a layer's statistic is the mean of its
    parameters, and the task's score is ``exp(-sum_l (stat_l - target_kl)^2 / width)``: a smooth
    landscape with one optimum per task, so a search has something real to climb. The holdout score
    is the same function with targets shifted by ``holdout_shift`` (a slightly different optimum).

    Args:
        targets: task name -> per-layer target statistics (length = number of layers).
        width: how quickly the score falls off.
        holdout_shift: added to every target for the holdout split.
    """

    def __init__(self, targets: Mapping[str, list[float]], *, width: float = 1e-3, holdout_shift: float = 0.0) -> None:
        self.targets = {k: torch.tensor(v, dtype=torch.float64) for k, v in targets.items()}
        self.width = width
        self.holdout_shift = holdout_shift

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
        return list(self.targets) if split == "search" else [f"{k}_holdout" for k in self.targets]

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        t0 = time.perf_counter()
        stats = self.layer_stats(model)
        shift = self.holdout_shift if split == "holdout" else 0.0
        scores, stderr, n = {}, {}, {}
        for name, target in zip(self.task_names(split), self.targets.values()):
            if target.numel() != stats.numel():
                raise ValueError(f"FakeEvaluator: {target.numel()} targets for {stats.numel()} layers")
            d2 = float(((stats - target - shift) ** 2).sum())
            scores[name] = math.exp(-d2 / self.width)
            stderr[name] = 0.01
            n[name] = 100
        specs = [TaskSpec(k) for k in scores]
        agg, se = aggregate(specs, scores, stderr)
        return EvalResult(scores, stderr, agg, se, time.perf_counter() - t0, n)

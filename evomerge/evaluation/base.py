"""What scoring is: the parsed ``evaluate:`` section's types and the :class:`Evaluator` interface.

An evaluator scores a model held in memory on the search items or on the disjoint holdout items.
:class:`~evomerge.evaluation.lmeval.LMEvalEvaluator` is the real one (lm-eval's tasks, prompts and
metrics); :class:`~evomerge.evaluation.fake.FakeEvaluator` scores from tensors alone, for tests.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["TaskSpec", "EvalConfig", "EvalResult", "Evaluator", "aggregate", "SCORERS"]

# How lm-eval's loglikelihood requests are run: "shared" runs each distinct context once and scores
# its continuations from the cached keys/values (evaluation/scorer.py); "hflm" is lm-eval's HFLM,
# one full sequence per (context, continuation) pair. Both give the same numbers up to float rounding.
SCORERS = ("shared", "hflm")


@dataclass(frozen=True)
class TaskSpec:
    """One scored task: its lm-eval name, the metric read from its results, weight and shots."""

    name: str
    metric: str = "acc"
    weight: float = 1.0
    num_fewshot: int | None = None


@dataclass
class EvalConfig:
    """The parsed ``evaluate:`` section.

    ``limit`` takes the first ``limit`` docs of each search task (None: all). ``holdout_limit`` with
    an empty ``holdout`` list means: the holdout items are docs ``[limit, limit + holdout_limit)`` of
    the search tasks themselves; with holdout tasks it takes their first ``holdout_limit`` docs.
    ``file`` is the space file, named in errors found later (a holdout range past the end).
    ``scorer`` is one of :data:`SCORERS`.
    """

    search: list[TaskSpec]
    holdout: list[TaskSpec] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    limit: int | None = None
    holdout_limit: int | None = None
    batch_size: int = 32
    preset: str | None = None
    file: str = ""
    scorer: str = "shared"

    @property
    def holdout_same_tasks(self) -> bool:
        """True when the holdout is a later doc range of the search tasks."""
        return not self.holdout and self.holdout_limit is not None

    def has_holdout(self) -> bool:
        return bool(self.holdout) or self.holdout_limit is not None


@dataclass
class EvalResult:
    """Scores of one model: per task, their standard errors and the weighted aggregate."""

    scores: dict[str, float]
    stderr: dict[str, float]
    aggregate: float
    aggregate_se: float
    seconds: float
    n_items: dict[str, int]


def aggregate(specs: Iterable[TaskSpec], scores: Mapping[str, float], stderr: Mapping[str, float]) -> tuple[float, float]:
    specs = list(specs)
    wsum = sum(s.weight for s in specs)
    agg = sum(s.weight * scores[s.name] for s in specs) / wsum
    se = math.sqrt(sum((s.weight * stderr.get(s.name, 0.0)) ** 2 for s in specs)) / wsum
    return agg, se


class Evaluator(ABC):
    """Scores a model on the search items or on the holdout items."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        """Score ``model`` (in memory) on ``split`` ("search" or "holdout")."""

    @abstractmethod
    def task_names(self, split: str = "search") -> list[str]:
        """Names of the tasks scored in ``split``."""

    def texts(self, split: str = "search") -> dict[str, list[str]]:
        """Prompt + gold answer strings per task of ``split`` (for the memorization probe)."""
        return {}

    def prompts(self, split: str = "search") -> dict[str, list[str]]:
        """The prompts (questions without answers) of each task's items of ``split``, in item order
        (mixture-of-experts routing prompts drawn from a task); may be empty."""
        return {}

    def datasets(self) -> dict[str, list[str]]:
        """Dataset paths (hub ids or local files) per task; may be empty."""
        return {}

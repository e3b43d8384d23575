"""What scoring is: the parsed ``evaluate:`` section's types and the :class:`Evaluator` interface.

An evaluator scores a model held in memory on the search items or on the disjoint holdout items.
:class:`~evomerge.evaluation.lmeval.LMEvalEvaluator` is the real one (lm-eval's tasks, prompts and
metrics); :class:`~evomerge.evaluation.fake.FakeEvaluator` scores from tensors alone, for tests.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "TaskSpec",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "StagedEvaluation",
    "aggregate",
    "item_weights",
    "SCORERS",
    "SPLITS",
    "split_holdout",
    "digest_of",
]

# How lm-eval's loglikelihood requests are run: "shared" runs each distinct context once and scores
# its continuations from the cached keys/values (evaluation/scorer.py); "hflm" is lm-eval's HFLM,
# one full sequence per (context, continuation) pair. Both give the same numbers up to float rounding.
SCORERS = ("shared", "hflm")

# The item sets a model is scored on. Search items guide the sampler; validation items (a part of
# the holdout) re-score the finalists and choose the trial a user gets; test items (the rest of the
# holdout) are scored for the chosen trial and the baselines only, and never choose anything, so
# the score reported for the chosen model is an unbiased estimate. "holdout" is validation + test.
SPLITS = ("search", "validation", "test", "holdout")

# The default share of each holdout task's items that are validation items.
VALIDATION = 0.5


def split_holdout(ids: Sequence[int], validation: float) -> tuple[list[int], list[int]]:
    """Split one task's holdout items into (validation, test), interleaved so that both spread
    over the whole range (task files are often ordered by source or difficulty): item ``i`` is a
    validation item when ``floor((i + 1) * validation)`` steps past ``floor(i * validation)``.

    Example:
        >>> split_holdout(range(10, 16), 0.5)
        ([11, 13, 15], [10, 12, 14])
        >>> split_holdout(range(4), 0.0)
        ([], [0, 1, 2, 3])
    """
    val: list[int] = []
    test: list[int] = []
    for i, doc in enumerate(ids):
        (val if math.floor((i + 1) * validation) > math.floor(i * validation) else test).append(doc)
    return val, test


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
    ``scorer`` is one of :data:`SCORERS`. ``validation`` is the share of each holdout task's
    items that are validation items (:func:`split_holdout`); the rest are test items.
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
    validation: float = VALIDATION


@dataclass
class EvalResult:
    """Scores of one model: per task, their standard errors and the weighted aggregate.

    ``items`` holds, where the evaluator knows them, each task's per-item metric values in the
    order of its items (lm-eval's per-document value of the task's metric: 0/1 for ``acc``);
    ``None`` for an item not scored (a stopped candidate's). Paired comparisons use them.
    """

    scores: dict[str, float]
    stderr: dict[str, float]
    aggregate: float
    aggregate_se: float
    seconds: float
    n_items: dict[str, int]
    items: dict[str, list[float | None]] = field(default_factory=dict)


def aggregate(
    specs: Iterable[TaskSpec], scores: Mapping[str, float], stderr: Mapping[str, float]
) -> tuple[float, float]:
    specs = list(specs)
    wsum = sum(s.weight for s in specs)
    agg = sum(s.weight * scores[s.name] for s in specs) / wsum
    se = math.sqrt(sum((s.weight * stderr.get(s.name, 0.0)) ** 2 for s in specs)) / wsum
    return agg, se


def item_weights(specs: Iterable[TaskSpec], counts: Mapping[str, int]) -> dict[str, float]:
    """Per task, the factor that turns an item's value into its share of the aggregate.

    With ``N`` items in all, the mean over every item of ``value * factor`` is the weighted
    aggregate of the task means: ``factor = weight / sum(weights) * N / n_task``.

    Example:
        >>> item_weights([TaskSpec("a"), TaskSpec("b", weight=3.0)], {"a": 10, "b": 30})
        {'a': 1.0, 'b': 1.0}
    """
    specs = [s for s in specs if counts.get(s.name)]
    wsum = sum(s.weight for s in specs)
    total = sum(counts[s.name] for s in specs)
    return {s.name: s.weight / wsum * total / counts[s.name] for s in specs}


def digest_of(value: object) -> str:
    """A short sha256 of a JSON-able value (keys sorted; other objects by ``str``)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StagedEvaluation(ABC):
    """One model's evaluation on the search items, scored a subset at a time.

    The contract: :meth:`score` may be called any number of times with any items; :meth:`result`
    then scores whatever was not scored yet and returns exactly what ``evaluate(model, "search")``
    returns (the same lm-eval metrics and aggregation), without scoring an item twice.
    """

    @abstractmethod
    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
        """Score some items.

        Args:
            items: task name -> indices into that task's search items (0 .. count - 1).

        Returns:
            task name -> {index: the item's metric value}.
        """

    @abstractmethod
    def result(self) -> EvalResult:
        """The full search evaluation of the model (every item), reusing the items scored so far."""

    @property
    @abstractmethod
    def scored(self) -> int:
        """How many distinct items were scored so far."""


class Evaluator(ABC):
    """Scores a model on one of the item sets of :data:`SPLITS`: the search items, or the
    validation or test part of the holdout items (an evaluator without holdout items has tasks
    for "search" only: :meth:`task_names` of the others is empty).

    Evaluators that can score the search items a subset at a time (needed to stop hopeless
    candidates early) return item counts from :meth:`item_counts` and a
    :class:`StagedEvaluation` from :meth:`staged`; the defaults say they cannot.
    """

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        """Score ``model`` (in memory) on ``split`` (one of :data:`SPLITS`)."""

    @abstractmethod
    def task_names(self, split: str = "search") -> list[str]:
        """Names of the tasks scored in ``split``."""

    def texts(self, split: str = "search") -> dict[str, list[str]]:
        """Prompt + gold answer strings per task of ``split`` (for the memorization probe)."""
        return {}

    def digest(self) -> str:
        """A digest of what a score depends on (tasks, metrics, weights, shots, which items are in
        which split and what they say): a study refuses to resume when it changed, since its
        earlier scores would not compare with new ones. The default covers the task names of
        every split; evaluators that know more include it."""
        return digest_of({split: self.task_names(split) for split in SPLITS})

    def prompts(self, split: str = "search") -> dict[str, list[str]]:
        """The prompts (questions without answers) of each task's items of ``split``, in item order
        (mixture-of-experts routing prompts drawn from a task); may be empty."""
        return {}

    def datasets(self) -> dict[str, list[str]]:
        """Dataset paths (hub ids or local files) per task; may be empty."""
        return {}

    def item_counts(self) -> dict[str, int]:
        """Search items per task when :meth:`staged` is supported, else ``{}``."""
        return {}

    def specs(self) -> list[TaskSpec]:
        """The search tasks with their weights (for :func:`item_weights`)."""
        return [TaskSpec(n) for n in self.task_names("search")]

    def staged(self, model: torch.nn.Module) -> StagedEvaluation | None:
        """A :class:`StagedEvaluation` of ``model`` on the search items, or None (not supported)."""
        return None

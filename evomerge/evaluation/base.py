"""What scoring is: the parsed ``evaluate:`` section's types and the :class:`Evaluator` interface.

An evaluator scores a model held in memory on the search items or on the disjoint holdout items.
:class:`~evomerge.evaluation.lmeval.LMEvalEvaluator` is the real one (lm-eval's tasks, prompts and
metrics); :class:`~evomerge.evaluation.fake.FakeEvaluator` scores from tensors alone, for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evomerge.errors import EvomergeError

__all__ = [
    "say_once",
    "TaskSpec",
    "EvalConfig",
    "Scores",
    "make_scores",
    "Evaluator",
    "StagedEvaluation",
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
    ``chat_template`` renders every prompt with the tokenizer's chat template, the few-shot
    examples as turns (lm-eval's ``apply_chat_template`` and ``fewshot_as_multiturn``).
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
    chat_template: bool = False


@dataclass(frozen=True)
class Scores:
    """One evaluation of one model on one split: per-task scores, their standard errors, the
    weighted aggregate and the seconds it took. ``n_items`` items were scored (0: not recorded, a
    study of an older version); ``values`` holds each task's per-item metric values in item order
    where the evaluator gives them (lm-eval's per-document value of the task's metric: 0/1 for
    ``acc``; None for an item a stopped candidate did not score). Paired comparisons use them.

    Example:
        >>> s = Scores({"a": 0.5}, {"a": 0.05}, 0.5, 0.05, 1.0)
        >>> Scores.from_dict(s.to_dict()) == s
        True
    """

    scores: dict[str, float]
    stderr: dict[str, float]
    aggregate: float
    aggregate_se: float
    seconds: float
    n_items: int = 0
    values: dict[str, list[float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.values:
            del d["values"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Scores | None:
        if not d:
            return None
        return cls(
            dict(d.get("scores") or {}),
            {k: float(v) for k, v in (d.get("stderr") or {}).items()},
            float(d["aggregate"]),
            float(d.get("aggregate_se") or 0.0),
            float(d.get("seconds") or 0.0),
            int(d.get("n_items") or 0),
            {k: list(v) for k, v in (d.get("values") or {}).items()},
        )

    def counts(self) -> dict[str, int]:
        """Items per task (those with per-item values)."""
        return {k: len(v) for k, v in self.values.items()}

    def complete(self, counts: Mapping[str, int]) -> bool:
        """Whether ``values`` holds a value for every item of every task in ``counts``."""
        return all(
            len(self.values.get(k) or ()) == n and None not in self.values[k]
            for k, n in counts.items()
        )

    def checked(self) -> Scores:
        """These scores, after checking every task gave one.

        Raises:
            EvomergeError: a task gave no score (NaN or missing).
        """
        bad = [t for t, v in self.scores.items() if v is None or v != v]  # NaN: unequal to itself
        if bad:
            raise EvomergeError(f"evaluation gave no score for {', '.join(bad)}")
        return self


def make_scores(
    specs: Iterable[TaskSpec],
    scores: Mapping[str, float],
    stderr: Mapping[str, float],
    seconds: float,
    values: Mapping[str, Sequence[float | None]] | None = None,
    n_items: int | None = None,
) -> Scores:
    """The :class:`Scores` of per-task scores, their weighted aggregate (a NaN standard error
    counts as 0 there) and the items scored (every value's, or ``n_items``)."""
    specs = list(specs)
    known = {k: (0.0 if math.isnan(v) else v) for k, v in stderr.items()}
    wsum = sum(s.weight for s in specs)
    agg = sum(s.weight * scores[s.name] for s in specs) / wsum
    se = math.sqrt(sum((s.weight * known.get(s.name, 0.0)) ** 2 for s in specs)) / wsum
    per_item = {k: list(v) for k, v in (values or {}).items()}
    n = sum(len(v) for v in per_item.values()) if n_items is None else n_items
    return Scores(dict(scores), dict(stderr), agg, se, seconds, n, per_item)


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

    values: dict[str, dict[int, float]]  # task name -> {index: value} of the items scored so far

    @abstractmethod
    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
        """Score some items.

        Args:
            items: task name -> indices into that task's search items (0 .. count - 1).

        Returns:
            task name -> {index: the item's metric value}.
        """

    @abstractmethod
    def result(self) -> Scores:
        """The full search evaluation of the model (every item), reusing the items scored so far."""

    @property
    def scored(self) -> int:
        """How many distinct items were scored so far."""
        return sum(len(v) for v in self.values.values())


class Evaluator(ABC):
    """Scores a model on one of the item sets of :data:`SPLITS`: the search items, or the
    validation or test part of the holdout items (an evaluator without holdout items has tasks
    for "search" only: :meth:`task_names` of the others is empty).

    Evaluators that can score the search items a subset at a time (needed to stop hopeless
    candidates early) return item counts from :meth:`item_counts` and a
    :class:`StagedEvaluation` from :meth:`staged`; the defaults say they cannot.
    """

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str = "search") -> Scores:
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

    def include_path(self) -> list[str]:
        """The local task directories the tasks come from (empty: none)."""
        return []

    def tasks_index(self) -> Any:
        """lm-eval's ``TaskManager`` that knows the tasks (the contamination flags look up each
        task's dataset in it), or None for an evaluator without lm-eval tasks."""
        return None

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


_SAID: set[tuple[str, str]] = set()


def say_once(key: str, message: str, *, log: logging.Logger, level: int = logging.INFO) -> None:
    """Log ``message`` to ``log`` the first time ``key`` comes up for that logger in this process
    (evaluators and scorers are built again per study and per trial; a note about the setup is
    said once).

    Args:
        key: what the message is about.
        message: the line.
        log: the logger (its name scopes ``key``).
        level: the logging level.
    """
    if (log.name, key) not in _SAID:
        _SAID.add((log.name, key))
        log.log(level, message)

"""lm-eval's search items scored a subset at a time (to stop hopeless candidates early).

A paired comparison of two candidates needs each item's metric value, and stopping early needs
those values for a subset of the items without changing what the full evaluation gives. Three
pieces do it:

- :class:`RequestBank` builds the requests of every search item once per evaluator, with lm-eval's
  own ``build_all_requests`` over all search docs after the few-shot reseed every evaluation does
  (:func:`~evomerge.evaluation.hflm.reseed_fewshot`):
  each item's prompt is the one a full evaluation gives it (few-shot examples are drawn in doc
  order, so building a subset alone would give later items other examples).
- :class:`~evomerge.evaluation.hflm.MemoLM` wraps a candidate's LM: a request it ran once is
  answered from memory.
- :class:`LMEvalStaged` runs a round's items through that LM and computes each item's value with
  the task's own filters and ``process_results``; :meth:`LMEvalStaged.result` then runs lm-eval's
  ``evaluate`` over every item with the same LM, so lm-eval computes the metrics, the aggregation
  and the groups of the full result, and the model runs each request exactly once.

Only tasks whose metric lm-eval aggregates by the mean (``acc``, ``acc_norm``, ``exact_match``...)
have additive per-item values; :func:`stageable` says whether every task qualifies.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evomerge.compat import build_task_requests, quiet_task_progress, task_filters
from evomerge.evaluation.base import Scores, StagedEvaluation, TaskSpec
from evomerge.evaluation.hflm import MemoLM, reseed_fewshot

__all__ = [
    "RequestBank",
    "LMEvalStaged",
    "metric_filter",
    "metric_value",
    "stageable",
    "items_from_samples",
]


def metric_filter(metric: str, filters: Sequence[str]) -> tuple[str, str]:
    """(metric name, filter key) of a spec's ``metric``: ``exact_match,flexible-extract`` names its
    filter; otherwise ``none`` when the task has it, else its first filter (as the results are read).

    Example:
        >>> metric_filter("acc", ["none"]), metric_filter("exact_match,strict", ["strict", "flex"])
        (('acc', 'none'), ('exact_match', 'strict'))
    """
    name, _, filt = metric.partition(",")
    if filt:
        return name, filt
    return name, "none" if "none" in filters or not filters else sorted(filters)[0]


def metric_value(res: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """(score, stderr) of ``metric`` in one task's lm-eval results; ``metric`` may name a filter
    (``exact_match,flexible-extract``), else ``,none`` is preferred, then the first filter.

    Returns:
        The pair, or None when the results have no such metric.
    """
    keys = (
        [metric]
        if "," in metric
        else [f"{metric},none"]
        + sorted(k for k in res if k.startswith(f"{metric},") and "_stderr" not in k)
    )
    for key in keys:
        if key in res and isinstance(res[key], (int, float)):
            name, _, filt = key.partition(",")
            se = res.get(f"{name}_stderr,{filt}")
            se = float(se) if isinstance(se, (int, float)) else float("nan")
            return float(res[key]), se
    return None


def _filters(task: Any) -> list[str]:
    return [f.name for f in task_filters(task)] or ["none"]


def stageable(
    tasks: Mapping[str, Any], leaves: Mapping[str, list[str]], specs: Sequence[TaskSpec]
) -> str:
    """Why the tasks cannot be scored item by item ("" when they can): every leaf task's metric
    must be one lm-eval aggregates by the mean."""
    from lm_eval.api.metrics import mean

    for spec in specs:
        for leaf in leaves.get(spec.name, []):
            name, _ = metric_filter(spec.metric, _filters(tasks[leaf]))
            agg = tasks[leaf].aggregation().get(name)
            if agg is not mean:
                return f"task {leaf!r}: metric {name!r} is not aggregated by the mean"
    return ""


class RequestBank:
    """The lm-eval requests of every search item, built once (see the module docstring).

    Args:
        tasks: leaf task name -> lm-eval ``Task``.
        ids: leaf task name -> the doc ids of its search items, ascending.
        chat: an lm-eval LM whose chat template renders the prompts, the few-shot examples as
            turns (as ``evaluate(apply_chat_template=True, fewshot_as_multiturn=True)``); None:
            plain prompts.
    """

    def __init__(
        self, tasks: Mapping[str, Any], ids: Mapping[str, list[int]], chat: Any = None
    ) -> None:
        self.tasks = dict(tasks)
        self.requests: dict[str, list[list[Any]]] = {}
        for leaf, task in self.tasks.items():
            reseed_fewshot([task])  # as the full evaluation does: the same prompts
            with quiet_task_progress():
                build_task_requests(task, ids[leaf], chat=chat)
            by_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:  # doc_id is the position among the selected docs
                by_doc[inst.doc_id].append(inst)
            n = len(ids[leaf])
            self.requests[leaf] = [sorted(by_doc[i], key=lambda x: x.idx) for i in range(n)]
            reseed_fewshot([task])


def items_from_samples(
    samples: Mapping[str, list[Mapping[str, Any]]],
    spec: TaskSpec,
    leaves: Sequence[str],
    ids: Mapping[str, list[int]],
    tasks: Mapping[str, Any],
) -> list[float | None]:
    """One spec's per-item values, in item order, from lm-eval's logged samples (None: not logged)."""
    out: list[float | None] = []
    for leaf in leaves:
        name, filt = metric_filter(spec.metric, _filters(tasks[leaf]))
        pos = {d: i for i, d in enumerate(ids[leaf])}
        vals: list[float | None] = [None] * len(ids[leaf])
        for s in samples.get(leaf, []):
            if (
                s.get("filter") == filt
                and s.get("doc_id") in pos
                and isinstance(s.get(name), (int, float))
            ):
                vals[pos[s["doc_id"]]] = float(s[name])
        out += vals
    return out


class LMEvalStaged(StagedEvaluation):
    """One candidate's search evaluation in rounds (see the module docstring).

    Args:
        bank: the search items' requests.
        specs: the search task specs.
        leaves: spec name -> its leaf task names.
        lm: the candidate's lm-eval LM (wrapped in a :class:`~evomerge.evaluation.hflm.MemoLM` here).
        finish: runs lm-eval's evaluation of every search item with a given LM.
    """

    def __init__(
        self,
        bank: RequestBank,
        specs: Sequence[TaskSpec],
        leaves: Mapping[str, list[str]],
        lm: Any,
        finish: Callable[[Any], Scores],
    ) -> None:
        self.bank, self.specs, self.leaves = bank, list(specs), leaves
        self.lm = MemoLM(lm)
        self.finish = finish
        self.values: dict[str, dict[int, float]] = {s.name: {} for s in self.specs}
        self.seconds = 0.0

    def _where(self, spec: TaskSpec, index: int) -> tuple[str, int]:
        for leaf in self.leaves[spec.name]:
            n = len(self.bank.requests[leaf])
            if index < n:
                return leaf, index
            index -= n
        raise IndexError(f"task {spec.name!r} has no item {index}")

    def score(self, items: Mapping[str, Sequence[int]]) -> dict[str, dict[int, float]]:
        t0 = time.perf_counter()
        todo: dict[str, list[tuple[int, str, int]]] = {}
        for spec in self.specs:
            want = [
                i
                for i in dict.fromkeys(items.get(spec.name, ()))
                if i not in self.values[spec.name]
            ]
            todo[spec.name] = [(i, *self._where(spec, i)) for i in want]
        # fresh copies of the stored requests: responses are written into them
        fresh = {
            (leaf, pos): [
                dataclasses.replace(r, resps=[], filtered_resps={})
                for r in self.bank.requests[leaf][pos]
            ]
            for got in todo.values()
            for _, leaf, pos in got
        }
        by_kind: dict[str, list[Any]] = defaultdict(list)
        for reqs in fresh.values():
            for r in reqs:
                by_kind[r.request_type] += [r] * (r.repeats or 1)
        for kind, reqs in by_kind.items():
            for r, x in zip(reqs, getattr(self.lm, kind)(reqs), strict=True):
                r.resps.append(x)
        for leaf in {leaf for leaf, _ in fresh}:
            insts = [r for (lf, _), reqs in fresh.items() if lf == leaf for r in reqs]
            for f in task_filters(self.bank.tasks[leaf]):
                f.apply(insts)
        for spec in self.specs:
            for i, leaf, pos in todo[spec.name]:
                task, reqs = self.bank.tasks[leaf], fresh[(leaf, pos)]
                name, filt = metric_filter(spec.metric, _filters(task))
                metrics = task.process_results(reqs[0].doc, [r.filtered_resps[filt] for r in reqs])
                self.values[spec.name][i] = float(metrics[name])
        self.seconds += time.perf_counter() - t0
        return {
            s.name: {i: self.values[s.name][i] for i in items.get(s.name, ())} for s in self.specs
        }

    def result(self) -> Scores:
        r = self.finish(self.lm)
        return dataclasses.replace(r, seconds=r.seconds + self.seconds)

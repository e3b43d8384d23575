"""Contamination and overfitting flags: the rules, and the :class:`Assessment` of one study.

evomerge does not refuse to search on public benchmarks (mergekit-evolve does); it measures
and flags, so that the results table, the report, the exported recipe and the model card
carry the evidence. Five flags (:data:`FLAG_COLUMNS`), each a column with a companion
``<flag>_evidence`` column:

``merge_lineage``
    A source model, or an ancestor reachable from it, is itself a merge
    (:mod:`evomerge.contamination.lineage`).
``eval_data_in_training``
    A card ``datasets:`` entry of a source or of one of its ancestors names a dataset that
    an evaluation task reads (:mod:`evomerge.contamination.taskdata`).
``public_benchmark_search``
    Study level: a search task is a public benchmark (:data:`PUBLIC_BENCHMARKS`, their
    ``tiny*`` variants and ``leaderboard_*``), by name or by its dataset.
``overfit``
    A re-scored trial's search score exceeds its score on unseen items (its test score where it
    has one, else its validation score) by more than twice their combined standard error:
    ``search - unseen > 2 * sqrt(se_search**2 + se_unseen**2)``.
``memorization_probe``
    Opt-in Min-K%++ probe; see :mod:`evomerge.contamination.probe`.

Typical use by the study::

    a = assess(model_refs, search_tasks, holdout_tasks, include_path=task_dir)
    for line in a.warnings(): log.warning(line)          # loud, at start
    row.update(a.columns())                              # every trials.csv row
    row.update(overfit_columns(s, s_se, t, t_se, "test"))  # re-scored rows
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from evomerge.contamination.lineage import Lineage, Resolver, default_resolve, model_lineage
from evomerge.contamination.taskdata import DatasetHit, dataset_hits, norm_dataset, task_datasets

__all__ = [
    "FLAG_COLUMNS",
    "PUBLIC_BENCHMARKS",
    "public_benchmark_tasks",
    "OverfitResult",
    "overfit",
    "overfit_columns",
    "Assessment",
    "assess",
    "source_flags",
    "assessment_to_dict",
    "assessment_from_dict",
]

FLAG_COLUMNS = (
    "merge_lineage",
    "eval_data_in_training",
    "public_benchmark_search",
    "overfit",
    "memorization_probe",
)
PUBLIC_BENCHMARKS = (
    "arc",
    "ai2_arc",
    "hellaswag",
    "mmlu",
    "hendrycks_test",
    "gsm8k",
    "winogrande",
    "truthfulqa",
    "truthful_qa",
    "bigbench",
    "bbh",
    "agieval",
    "piqa",
    "openbookqa",
    "gpqa",
    "ifeval",
    "musr",
    # further widely reported lm-eval benchmarks
    "lambada",
    "boolq",
    "sciq",
    "triviaqa",
    "commonsense_qa",
    "social_iqa",
    "siqa",
    "logiqa",
    "mathqa",
    "minerva_math",
    "hendrycks_math",
    "humaneval",
    "mbpp",
    "squadv2",
)
_BENCH_RE = re.compile(r"^(?:tiny)?(?:" + "|".join(PUBLIC_BENCHMARKS) + r")(?:$|[_\-.:])", re.I)
_BENCH_ORGS = ("tinybenchmarks", "open-llm-leaderboard")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name on the hub


# ----------------------------------------------------------------------------- public benchmarks
def _is_benchmark_dataset(ds: str) -> bool:
    org = ds.split("/", 1)[0].lower() if _DATASET_ID.match(ds) else ""
    return bool(_BENCH_RE.match(norm_dataset(ds))) or org in _BENCH_ORGS


def public_benchmark_tasks(
    task_names: Iterable[str], datasets: Mapping[str, Iterable[str]] | None = None
) -> dict[str, str]:
    """Which tasks are public benchmarks, by name or by the dataset they read.

    Args:
        task_names: the search tasks.
        datasets: optional ``{task: datasets}`` (see
            :func:`~evomerge.contamination.taskdata.task_datasets`), so that a local task
            reading e.g. ``allenai/ai2_arc`` is caught whatever its name.
    Returns:
        ``{task: reason}`` for the flagged tasks only, in input order.
    """
    out: dict[str, str] = {}
    for t in dict.fromkeys(task_names):
        if _BENCH_RE.match(t) or re.match(r"^(?:leaderboard|tinybenchmarks)(?:$|_)", t, re.I):
            out[t] = "public benchmark name"
            continue
        hit = next(
            (d for d in sorted((datasets or {}).get(t, ())) if _is_benchmark_dataset(d)), None
        )
        if hit is not None:
            out[t] = f"reads {hit}"
    return out


# ----------------------------------------------------------------------------- overfit
class OverfitResult(NamedTuple):
    flag: bool
    gap: float  # search - holdout
    threshold: float  # 2 * sqrt(se_search**2 + se_holdout**2)


def overfit(
    search: float | None, search_se: float | None, holdout: float | None, holdout_se: float | None
) -> OverfitResult:
    """Search score above holdout score by more than twice their combined standard error.

    Args:
        search: the finalist's score on the search items.
        search_se: its standard error.
        holdout: the finalist's score on the holdout items.
        holdout_se: its standard error.
    Returns:
        ``OverfitResult(flag, gap, threshold)`` with ``gap = search - holdout`` and
        ``threshold = 2 * sqrt(search_se**2 + holdout_se**2)``; any missing/NaN input gives
        no flag and NaN threshold.
    Raises:
        ValueError: a negative standard error.
    """
    vals = [
        float("nan") if v is None else float(v) for v in (search, search_se, holdout, holdout_se)
    ]
    s, s_se, h, h_se = vals
    if (s_se < 0) or (h_se < 0):
        raise ValueError(f"standard errors must be >= 0, got {s_se} and {h_se}")
    gap = s - h
    if any(math.isnan(v) for v in vals):
        return OverfitResult(False, gap, float("nan"))
    threshold = 2.0 * math.hypot(s_se, h_se)
    return OverfitResult(gap > threshold, gap, threshold)


def overfit_columns(
    search: float | None,
    search_se: float | None,
    holdout: float | None,
    holdout_se: float | None,
    split: str = "holdout",
) -> dict[str, Any]:
    """``{"overfit": bool, "overfit_evidence": text}`` for one re-scored row (see :func:`overfit`);
    ``split`` names the unseen items the search score is compared with (test, validation)."""
    r = overfit(search, search_se, holdout, holdout_se)
    if math.isnan(r.threshold):
        what = (
            f"no {split} score"
            if holdout is None or math.isnan(float(holdout))
            else "score or standard error missing"
        )
        return {"overfit": False, "overfit_evidence": what}
    op = ">" if r.flag else "<="
    text = (
        f"search {search:.3f} ± {search_se:.3f} vs {split} {holdout:.3f} ± {holdout_se:.3f}: "
        f"gap {r.gap:+.3f} {op} 2 SE {r.threshold:.3f}"
    )
    return {"overfit": r.flag, "overfit_evidence": text}


# ----------------------------------------------------------------------------- assessment
@dataclass(frozen=True)
class Assessment:
    """Everything the flags know about one study before any trial runs."""

    sources: tuple[Lineage, ...]
    search_tasks: tuple[str, ...]
    holdout_tasks: tuple[str, ...] = ()
    task_datasets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dataset_hits: tuple[DatasetHit, ...] = ()
    public_benchmarks: Mapping[str, str] = field(default_factory=dict)

    def merge_sources(self) -> list[Lineage]:
        """Sources whose lineage (themselves included) holds a merge."""
        return [s for s in self.sources if s.merges()]

    def source_columns(self) -> dict[str, Any]:
        """``merge_lineage``, ``eval_data_in_training`` and their evidence columns."""
        parts = []
        for s in self.sources:
            if s.merges():
                why = "; ".join(f"{n.model}: {', '.join(n.evidence)}" for n in s.merges())
                parts.append(f"{s.chain()} [{why}]")
            elif not s.available:
                parts.append(f"{s.model}: not available locally (lineage unknown)")
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for h in self.dataset_hits:
            grouped.setdefault((h.source, h.via, h.card_dataset), []).append(h.task)
        data = [
            f"{src}{'' if via == src else ' via ' + via}: {ds} (task{'s' if len(ts) > 1 else ''} "
            f"{', '.join(dict.fromkeys(ts))})"
            for (src, via, ds), ts in grouped.items()
        ]
        return {
            "merge_lineage": bool(self.merge_sources()),
            "merge_lineage_evidence": " | ".join(parts),
            "eval_data_in_training": bool(self.dataset_hits),
            "eval_data_in_training_evidence": " | ".join(data),
        }

    def study_columns(self) -> dict[str, Any]:
        """``public_benchmark_search`` and its evidence."""
        return {
            "public_benchmark_search": bool(self.public_benchmarks),
            "public_benchmark_search_evidence": ", ".join(
                f"{t} ({why})" for t, why in self.public_benchmarks.items()
            ),
        }

    def columns(self) -> dict[str, Any]:
        """All columns known before scoring (add :func:`overfit_columns` per finalist)."""
        return {**self.source_columns(), **self.study_columns()}

    def warnings(self) -> list[str]:
        """Loud one-line warnings for the start of a search, one per raised flag."""
        cols, out = self.columns(), []
        if cols["public_benchmark_search"]:
            out.append(
                "WARNING: public_benchmark_search: the search optimizes on public benchmark "
                f"items ({cols['public_benchmark_search_evidence']}); scores on these "
                "tasks will overstate the merge, and a leaderboard score of the result "
                "is contaminated by this search. Prefer private tasks; keep benchmarks "
                "for the holdout."
            )
        if cols["merge_lineage"]:
            out.append(f"WARNING: merge_lineage: {cols['merge_lineage_evidence']}")
        if cols["eval_data_in_training"]:
            out.append(f"WARNING: eval_data_in_training: {cols['eval_data_in_training_evidence']}")
        return out


def assess(
    model_refs: Iterable[str],
    search_tasks: Iterable[str],
    holdout_tasks: Iterable[str] = (),
    *,
    include_path: Any = None,
    resolve: Resolver = default_resolve,
    task_manager: Any = None,
    base_dir: str | os.PathLike[str] | None = None,
    max_depth: int = 8,
) -> Assessment:
    """Compute the study-level and source flags once, before a search.

    Args:
        model_refs: every source model of the space (base model included).
        search_tasks: tasks the search optimizes on.
        holdout_tasks: tasks scored only for the holdout (checked for eval data too).
        include_path: lm-eval include path for local tasks.
        resolve: see :func:`~evomerge.contamination.lineage.model_lineage`.
        base_dir: see :func:`~evomerge.contamination.lineage.model_lineage`.
        max_depth: see :func:`~evomerge.contamination.lineage.model_lineage`.
        task_manager: an ``lm_eval.tasks.TaskManager`` to reuse.
    Returns:
        The :class:`Assessment`.
    """
    search, holdout = tuple(dict.fromkeys(search_tasks)), tuple(dict.fromkeys(holdout_tasks))
    ds = task_datasets([*search, *holdout], include_path, task_manager=task_manager)
    sources = tuple(
        model_lineage(r, resolve, base_dir=base_dir, max_depth=max_depth)
        for r in dict.fromkeys(model_refs)
    )
    hits = tuple(h for s in sources for h in dataset_hits(s, ds))
    return Assessment(
        sources,
        search,
        holdout,
        {k: frozenset(v) for k, v in ds.items()},
        hits,
        public_benchmark_tasks(search, ds),
    )


def source_flags(
    model_refs: Iterable[str],
    task_names: Iterable[str],
    include_path: Any = None,
    resolve: Resolver = default_resolve,
) -> dict[str, Any]:
    """The source columns of ``trials.csv`` (see :meth:`Assessment.source_columns`)."""
    return assess(
        model_refs, (), task_names, include_path=include_path, resolve=resolve
    ).source_columns()


# ----------------------------------------------------------------------------- JSON form
def _lineage_to_dict(n: Lineage) -> dict[str, Any]:
    return {
        "model": n.model,
        "path": n.path,
        "is_merge": n.is_merge,
        "evidence": list(n.evidence),
        "parents": list(n.parents),
        "ancestors": [_lineage_to_dict(a) for a in n.ancestors],
        "relation": n.relation,
        "datasets": list(n.datasets),
        "notes": list(n.notes),
    }


def _lineage_from_dict(d: Mapping[str, Any]) -> Lineage:
    return Lineage(
        d["model"],
        d.get("path"),
        bool(d.get("is_merge")),
        tuple(d.get("evidence", ())),
        tuple(d.get("parents", ())),
        tuple(_lineage_from_dict(a) for a in d.get("ancestors", ())),
        d.get("relation", ""),
        tuple(d.get("datasets", ())),
        tuple(d.get("notes", ())),
    )


def assessment_to_dict(a: Assessment) -> dict[str, Any]:
    """A JSON-able form of an :class:`Assessment` (stored with a study, so that export and
    report need not rebuild lm-eval's task index)."""
    return {
        "sources": [_lineage_to_dict(s) for s in a.sources],
        "search_tasks": list(a.search_tasks),
        "holdout_tasks": list(a.holdout_tasks),
        "task_datasets": {k: sorted(v) for k, v in a.task_datasets.items()},
        "dataset_hits": [list(h) for h in a.dataset_hits],
        "public_benchmarks": dict(a.public_benchmarks),
    }


def assessment_from_dict(d: Mapping[str, Any]) -> Assessment:
    """The inverse of :func:`assessment_to_dict`."""
    return Assessment(
        tuple(_lineage_from_dict(s) for s in d.get("sources", ())),
        tuple(d.get("search_tasks", ())),
        tuple(d.get("holdout_tasks", ())),
        {k: frozenset(v) for k, v in d.get("task_datasets", {}).items()},
        tuple(DatasetHit(*h) for h in d.get("dataset_hits", ())),
        dict(d.get("public_benchmarks", {})),
    )

"""What a search stores in the Optuna storage, typed, and the one place that writes and reads it.

The storage is the single source of truth of a study. Each record below has one home in it:

| record | where | key |
|---|---|---|
| :class:`TrialRecord` of a searched trial | the trial's user attributes | ``result`` |
| :class:`TrialRecord` of a baseline (``state``, ``search``, ``validation``, ``test`` set) | the study's user attributes | ``baseline:<name>`` |
| :class:`Scores` of a trial's re-score on the validation items | the study's user attributes | ``validation:<number>`` |
| :class:`Scores` of a trial's score on the test items | the study's user attributes | ``test:<number>`` |
| :class:`Scores` of a finalist's holdout re-score, in a study made before the validation/test split (that score also chose the trial) | the study's user attributes | ``holdout:<number>`` |
| memorization-probe columns of a finalist | the study's user attributes | ``probe:<number>`` |
| a hand recipe, or a data-flow source's own path, queued as a searched trial (its YAML text) | the study's user attributes | ``enqueued:<name>`` (``enqueued:path:<source>``) |
| why a trial left RUNNING by a dead process failed | the study's user attributes | ``died:<number>`` |
| :class:`StudyMeta` (seed, tasks, flags...) | the study's user attributes | one key per field |
| the space fingerprint the study was set up for (meta, assessment, hand recipes queued) | the study's user attributes | ``setup`` |

Trial user attributes also hold ``proc`` (pid and host of the process running it), ``baseline``
(the hand recipe a queued trial came from); a retried trial's system attributes hold the trial it
repeats (Optuna's ``RetryFailedTrialCallback``; ``retry_of`` in older studies). The keys
and dict shapes are the file format of existing studies: keep them. Claims (which worker runs
which once-per-study task) are studies of their own, see :mod:`evomerge.search.distributed.claims`.

Several workers write one study: a record is written by the one worker that ran its task, and read
fresh (:meth:`StudyRecords.refresh`) wherever another worker may have written it.

Example:
    >>> s = Scores({"a": 0.5}, {"a": 0.05}, 0.5, 0.05, 1.0)
    >>> Scores.from_dict(s.to_dict()) == s
    True
    >>> r = TrialRecord(method="ties", search=s)
    >>> TrialRecord.from_dict(r.to_dict()).search.aggregate
    0.5
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from evomerge.engine.rng import STREAM
from evomerge.evaluation.base import Scores
from evomerge.search.distributed.liveness import HOST

__all__ = ["Scores", "TrialRecord", "StudyMeta", "StudyRecords", "study_stream"]


@dataclass
class TrialRecord:
    """What one candidate (a searched trial or a baseline) merged and scored.

    Attributes:
        method: its ``merge_method``.
        recipe: the exact recipe merged, as YAML (what export writes and finalists re-merge).
        merge_s, eval_s: seconds spent merging and scoring the search items.
        digest: hash of the merged tensors.
        search: its scores on the search items.
        error: why it failed ("" when it did not).
        state: baselines only (searched trials have Optuna's state): COMPLETE or FAIL.
        validation, test: baselines only (a searched trial's re-scores are records of their own).
        holdout: a baseline of a study made before the validation/test split.
        reused_from: the earlier trial whose merged tensors had the same digest, whose search
            scores this trial took instead of evaluating the same model again.
        estimate: a trial stopped early (PRUNED): the estimate of its full search score that
            the sampler sees (see :mod:`evomerge.search.pruning`).
    """

    method: str | None = None
    recipe: str | None = None
    merge_s: float | None = None
    digest: str | None = None
    search: Scores | None = None
    eval_s: float | None = None
    error: str = ""
    state: str | None = None
    holdout: Scores | None = None
    reused_from: int | None = None
    estimate: float | None = None
    validation: Scores | None = None
    test: Scores | None = None

    @property
    def search_items(self) -> int | None:
        """Search items this candidate's own evaluation scored: 0 when it took another trial's
        scores, None when not recorded (a study older than item counts)."""
        if self.reused_from is not None:
            return 0
        return (self.search.n_items or None) if self.search is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            k: v.to_dict() if isinstance(v, Scores) else v
            for k, v in out.items()
            if v is not None and (k != "error" or v)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TrialRecord:
        d = {f.name: (d or {}).get(f.name) for f in fields(cls)}
        for k in ("search", "holdout", "validation", "test"):
            d[k] = Scores.from_dict(d[k])
        return cls(**(d | {"error": d["error"] or ""}))


@dataclass
class StudyMeta:
    """Study-level facts the readers (table, export, report) need without the space."""

    space: str | None = None
    space_file: str | None = None
    seed: int = 0
    model_refs: list[str] = field(default_factory=list)
    include_path: list[str] | None = None
    search_tasks: list[str] = field(default_factory=list)
    holdout_tasks: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)
    assessment: dict[str, Any] | None = None
    stream: int = 1  # random stream of masks (evomerge.engine.rng); studies that record none used 1
    # What chooses the trial a user gets: "validation" (the best validation score among the trials
    # re-scored there) or "search" (the best search score: the space has no validation items).
    # None: a study made before the validation/test split, whose holdout score chose.
    selection: str | None = None
    # Digests of what every score depends on (the evaluator's tasks and items; the source models'
    # files): a study whose inputs changed does not resume (see evomerge.search.inputs).
    inputs: dict[str, str] | None = None

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> StudyMeta:
        """The facts among a study's user attributes (an unset or None one keeps its default)."""
        return cls(**{f.name: a[f.name] for f in fields(cls) if a.get(f.name) is not None})


def study_stream(storage: Any, name: str) -> int:
    """The random stream of masks study ``name`` merges with, read before its trials are: the one
    it recorded when it was set up (1 for a study set up before streams were recorded), else the
    current :data:`~evomerge.engine.rng.STREAM` (a new study, or one not set up yet).

    Args:
        storage: an opened Optuna storage.
        name: the study's name.
    """
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:  # no such study yet
        return STREAM
    return StudyMeta.from_attrs(attrs).stream if attrs.get("space") is not None else STREAM


class StudyRecords:
    """Typed reads and writes of a study's records (see the module docstring for where each lives).

    Args:
        study: an ``optuna.Study``.
    """

    def __init__(self, study: Any) -> None:
        self.study = study
        self._attrs: dict[str, Any] | None = None

    # -- study-level ---------------------------------------------------------------------------
    def attrs(self) -> dict[str, Any]:
        """The study's user attributes (one storage read, cached until :meth:`refresh`)."""
        if self._attrs is None:
            self._attrs = dict(self.study.user_attrs)
        return self._attrs

    def _set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)
        if self._attrs is not None:
            self._attrs[key] = value

    def refresh(self) -> StudyRecords:
        """Forget cached study attributes (other workers write them too); returns ``self``."""
        self._attrs = None
        return self

    def setup_done(self, fingerprint: str) -> bool:
        """Whether the study was set up (meta, assessment, queued hand recipes) for this space."""
        return self.attrs().get("setup") == fingerprint

    def set_setup(self, fingerprint: str) -> None:
        self._set("setup", fingerprint)

    def meta(self) -> StudyMeta:
        return StudyMeta.from_attrs(self.attrs())

    def set_meta(self, meta: StudyMeta) -> None:
        for f in fields(StudyMeta):
            value = getattr(meta, f.name)
            if f.name in ("flags", "assessment") and not value:
                continue  # a study without an assessment keeps none (and a resumed one keeps its own)
            self._set(f.name, value)

    def set_inputs(self, inputs: Mapping[str, str]) -> None:
        self._set("inputs", dict(inputs))

    def baselines(self) -> dict[str, TrialRecord]:
        """Every baseline that ran, by name, in name order."""
        a = self.attrs()
        return {
            k.split(":", 1)[1]: TrialRecord.from_dict(a[k])
            for k in sorted(a)
            if k.startswith("baseline:")
        }

    def baseline_done(self, name: str, recipe: str | None = None) -> bool:
        """Whether the baseline ran, or was queued as a searched trial; with ``recipe`` (its YAML
        text), only when it ran or was queued with that recipe (a hand recipe whose file changed
        runs again). Records of older studies that kept no recipe count as done."""
        a = self.attrs()
        if f"baseline:{name}" in a:
            return recipe is None or a[f"baseline:{name}"].get("recipe") in (None, recipe)
        queued = a.get(f"enqueued:{name}")
        return queued is not None and (recipe is None or queued is True or queued == recipe)

    def set_baseline(self, name: str, record: TrialRecord) -> None:
        self._set(f"baseline:{name}", record.to_dict())

    def mark_enqueued(self, name: str, recipe: str) -> None:
        """Record that hand recipe ``name`` (or ``path:<source>``, a source's own path; its YAML
        text) was queued as a searched trial."""
        self._set(f"enqueued:{name}", recipe)

    def rescore(self, number: int, split: str) -> Scores | None:
        """Trial ``number``'s scores on ``split`` ("validation", "test", or "holdout": a study
        made before the validation/test split)."""
        return Scores.from_dict(self.attrs().get(f"{split}:{number}"))

    def set_rescore(self, number: int, split: str, scores: Scores) -> None:
        self._set(f"{split}:{number}", scores.to_dict())

    def probe(self, number: int) -> dict[str, Any] | None:
        return self.attrs().get(f"probe:{number}")

    def set_probe(self, number: int, columns: Mapping[str, Any]) -> None:
        self._set(f"probe:{number}", dict(columns))

    # -- per trial -----------------------------------------------------------------------------
    def trial(self, t: Any) -> TrialRecord:
        """The record of a (frozen) trial; the reason a dead process's trial failed included."""
        rec = TrialRecord.from_dict(t.user_attrs.get("result"))
        died = self.attrs().get(f"died:{t.number}")
        if died and not rec.error:
            rec.error = died
        return rec

    def scored(self, digest: str) -> tuple[int, Scores] | None:
        """A completed trial that scored these very tensors (same digest) on the search items, with
        its scores; None when there is none. Any worker's or any earlier run's trial counts."""
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            rec = self.trial(t)
            if rec.digest == digest and rec.search is not None and rec.reused_from is None:
                return t.number, rec.search
        return None

    @staticmethod
    def set_trial(trial: Any, record: TrialRecord) -> None:
        """Write a live trial's record (one storage write: each is a database commit)."""
        trial.set_user_attr("result", record.to_dict())

    @staticmethod
    def claim(trial: Any) -> None:
        """Mark a live trial as run by this process (a later resume recognises dead ones by it)."""
        trial.set_user_attr("proc", {"pid": os.getpid(), "host": HOST})

    @staticmethod
    def owner(t: Any) -> tuple[int | None, str | None]:
        proc = t.user_attrs.get("proc") or {}
        return proc.get("pid"), proc.get("host")

    @staticmethod
    def baseline_of(t: Any) -> str:
        return t.user_attrs.get("baseline", "") or ""

    @staticmethod
    def retry_of(t: Any) -> int | None:
        """The trial a retry repeats (Optuna's retry callback records it; older studies kept it
        in the user attribute ``retry_of``)."""
        from optuna.storages import RetryFailedTrialCallback

        return (
            RetryFailedTrialCallback.retried_trial_number(t)
            if "failed_trial" in t.system_attrs
            else t.user_attrs.get("retry_of")
        )

    @staticmethod
    def estimate_of(t: Any) -> float | None:
        """A stopped trial's estimate of its full search score (:attr:`TrialRecord.estimate`), read
        without parsing the whole record (the sampler reads it for every trial it models)."""
        v = (t.user_attrs.get("result") or {}).get("estimate")
        return None if v is None else float(v)

    def mark_died(self, number: int, message: str) -> None:
        self._set(f"died:{number}", message)

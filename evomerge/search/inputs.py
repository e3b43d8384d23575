"""What a study's scores depend on, and the checks that keep a study from mixing scores that do
not compare.

A study stores digests of its inputs when it is set up (``StudyMeta.inputs``):

- ``evaluation``: the evaluator's digest (:meth:`~evomerge.evaluation.base.Evaluator.digest`: the
  tasks with their metrics, weights and shots, which items are search, validation and test
  items, and what they say);
- ``sources``: every source model's files, by name, size and modification time.

A resumed study whose inputs changed is refused in one line: its earlier scores were taken on
other items or other models, and a new trial would take the score of an old one with the same
tensors. Hand recipes are checked one by one where they are scored
(:meth:`~evomerge.search.finalists.Holdout.baselines` scores a changed one again).

The results table is the other thing a study must not lose: :func:`check_table` refuses to
overwrite a ``trials.csv`` that holds trials the storage does not have (a database emptied,
truncated or replaced since the table was written).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.engine.sources import ModelSource
from evomerge.errors import EvomergeError
from evomerge.evaluation.base import digest_of

__all__ = ["sources_digest", "check_inputs", "check_table"]

_WHAT = {
    "evaluation": "its evaluation (the evaluate: section's tasks or items, or the task files)",
    "sources": "its source models (their files' sizes or modification times)",
}


def sources_digest(sources: Mapping[str, ModelSource]) -> str:
    """A digest of the source models' files: names, sizes and modification times."""
    stats = {
        ref: [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.files()]
        for ref, src in sorted(sources.items())
    }
    return digest_of(stats)


def check_inputs(
    stored: Mapping[str, str] | None, current: Mapping[str, str], *, file: str, study: str
) -> None:
    """Refuse to resume a study whose inputs changed since it was set up.

    Args:
        stored: the digests the study recorded (None: a study older than input digests).
        current: the same digests now.
        file: the space file (named in the message).
        study: the study's name.

    Raises:
        EvomergeError: a digest differs.
    """
    if not stored:
        return
    changed = [k for k in _WHAT if k in stored and k in current and stored[k] != current[k]]
    if changed:
        what = " and ".join(_WHAT[k] for k in changed)
        raise EvomergeError(
            f"{file}: study {study!r} was scored with other inputs: {what} changed since it "
            "started, so new scores would not compare with its earlier ones; restore them, or "
            "start a new study with --study NEW"
        )


def check_table(study: Any, path: Path) -> None:
    """Refuse to overwrite a results table that holds trials the storage cannot account for.

    A table row of a searched trial must be a trial of the study in the storage, with the same
    tensor hash. Baseline rows are not checked (a resumed study may score a baseline again).

    Args:
        study: the optuna study as opened from its storage.
        path: ``trials.csv``.

    Raises:
        EvomergeError: the table has a searched trial the storage has not (or another one under
            its number).
    """
    if not path.is_file():
        return
    try:
        old = pd.read_csv(path, usecols=["number", "baseline", "digest"], dtype=str)
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return  # not a table evomerge wrote (or empty): nothing of ours to lose
    old = old[old["baseline"].isna() & old["number"].notna()]
    if old.empty:
        return
    have = {
        t.number: (t.user_attrs.get("result") or {}).get("digest")
        for t in study.get_trials(deepcopy=False)
    }
    lost = [
        int(n)
        for n, d in zip(old["number"], old["digest"], strict=True)
        if int(n) not in have or (isinstance(d, str) and have[int(n)] not in (None, d))
    ]
    if lost:
        raise EvomergeError(
            f"{path}: holds {len(lost)} trial(s) that study {study.study_name!r} in its storage does "
            f"not have (e.g. trial {lost[0]}): was the study's database emptied or replaced? Move "
            f"{path.name} away to keep it, or search under another --study"
        )

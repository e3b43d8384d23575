"""The results table of a study: one row per trial (and per baseline), as ``trials.csv``.

Everything is read back from the Optuna storage, which is the single source of truth, through
:class:`~evomerge.search.records.StudyRecords`. ``trials.csv`` is rewritten (atomically) after every
trial, so it is never half-written and always matches the storage. Several workers of one host
write it in turn (a lock file beside it): each reads the storage after taking the lock, so the last
one to write has read every worker's last commit.

Columns: ``number``, ``state``, ``baseline`` (name, empty for searched trials), ``method``,
``p_<param>`` (every sampled parameter), ``score``/``score_se`` (aggregate search score),
``s_<task>``/``se_<task>``, ``estimate`` (a PRUNED trial: the estimate of its full search score, what the
sampler saw, see :mod:`evomerge.search.pruning`), ``holdout``/``holdout_se``, ``h_<task>``, ``items`` (search items this
row's evaluation scored: all of them, fewer for a PRUNED trial, 0 for a trial that took the scores
of an earlier one with the same tensors), ``holdout_items``, ``merge_s``, ``eval_s``,
``digest`` (hash of the merged tensors), the flag columns of :mod:`evomerge.contamination.rules` with their
``_evidence``, and ``error`` (why a trial failed).
"""

from __future__ import annotations

import fcntl
import math
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.contamination.rules import overfit_columns
from evomerge.errors import EvomergeError
from evomerge.io import atomic_file
from evomerge.search.records import Scores, StudyRecords, TrialRecord

__all__ = ["trials_frame", "write_trials_csv", "load_trials", "best_row", "is_number"]


def _score_cols(scores: Scores | None, prefix: str, se_prefix: str, agg: str) -> dict[str, Any]:
    if scores is None:
        return {}
    row: dict[str, Any] = {agg: scores.aggregate, f"{agg}_se": scores.aggregate_se}
    row.update({f"{prefix}{k}": v for k, v in scores.scores.items()})
    if se_prefix:
        row.update({f"{se_prefix}{k}": v for k, v in scores.stderr.items()})
    return row


def _items(rec: TrialRecord, holdout: Scores | None) -> dict[str, Any]:
    # Items this row's evaluations scored (see TrialRecord.search_items); None where the study
    # predates item counts.
    return {
        "items": rec.search_items,
        "holdout_items": (holdout.n_items or None) if holdout is not None else None,
    }


def trials_frame(study: Any) -> pd.DataFrame:
    """The results table of ``study``: searched trials, then baselines.

    Returns:
        A DataFrame with the columns described in the module docstring.
    """
    records = StudyRecords(study)
    meta = records.meta()
    rows: list[dict[str, Any]] = []
    for t in study.get_trials(deepcopy=False):
        rec = records.trial(t)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "baseline": records.baseline_of(t),
            "method": rec.method or "",
        }
        row.update({f"p_{k}": v for k, v in t.params.items()})
        row.update(_score_cols(rec.search, "s_", "se_", "score"))
        row["estimate"] = rec.estimate
        ho = records.holdout(t.number)
        row.update(_score_cols(ho, "h_", "", "holdout"))
        row.update(_items(rec, ho))
        wall = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        row.update(
            {
                "merge_s": rec.merge_s,
                "eval_s": rec.eval_s,
                "wall_s": wall,
                "digest": rec.digest or "",
                "retry_of": records.retry_of(t),
                "reused_from": rec.reused_from,
                "error": rec.error,
            }
        )
        rows.append(row)
    for name, b in records.baselines().items():
        row = {
            "number": None,
            "state": b.state or "COMPLETE",
            "baseline": name,
            "method": b.method or "",
        }
        row.update(_score_cols(b.search, "s_", "se_", "score"))
        row.update(_score_cols(b.holdout, "h_", "", "holdout"))
        row.update(_items(b, b.holdout))
        row.update(
            {"merge_s": b.merge_s, "eval_s": b.eval_s, "digest": b.digest or "", "error": b.error}
        )
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["number", "state", "baseline", "method", "score", "holdout"])
    for c in ("score", "score_se", "holdout", "holdout_se", "items", "holdout_items"):
        if c not in df:
            df[c] = math.nan
    df["number"] = df["number"].astype("Int64")
    # Flags: study-level and source columns hold for every row; overfit per scored finalist.
    for col, val in meta.flags.items():
        df[col] = [val] * len(df)
    over = [
        overfit_columns(r.score, r.score_se, r.holdout, r.holdout_se)
        if is_number(r.holdout) and is_number(r.score)
        else {"overfit": False, "overfit_evidence": ""}
        for r in df.itertuples()
    ]
    df["overfit"] = [o["overfit"] for o in over]
    df["overfit_evidence"] = [o["overfit_evidence"] for o in over]
    probes = {int(n): records.probe(int(n)) or {} for n in df["number"].dropna()}
    df["memorization_probe"] = [
        bool(probes.get(n, {}).get("memorization_probe", False)) if n is not pd.NA else False
        for n in df["number"]
    ]
    df["memorization_probe_evidence"] = [
        probes.get(n, {}).get("memorization_probe_evidence", "") if n is not pd.NA else ""
        for n in df["number"]
    ]
    df["items"] = df["items"].astype("Int64")
    df["holdout_items"] = df["holdout_items"].astype("Int64")
    front = [
        "number",
        "state",
        "baseline",
        "method",
        "score",
        "score_se",
        "holdout",
        "holdout_se",
        "items",
        "holdout_items",
    ]
    rest = [c for c in df.columns if c not in front]
    order = (
        front
        + sorted([c for c in rest if c.startswith("p_")])
        + sorted([c for c in rest if c.startswith(("s_", "se_", "h_"))])
        + [c for c in rest if not c.startswith(("p_", "s_", "se_", "h_"))]
    )
    return df[order]


def is_number(x: Any) -> bool:
    """Whether ``x`` is a number and not NaN (table cells may hold NaN, None or text)."""
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def write_trials_csv(study: Any, path: str | Path) -> pd.DataFrame:
    """Rewrite ``trials.csv`` from the storage, atomically (temp file, then rename), one writer
    of this host at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        df = trials_frame(study)
        atomic_file(path, lambda f: df.to_csv(f, index=False), mode="w")
    return df


def load_trials(path: str | Path) -> pd.DataFrame:
    """Read a ``trials.csv`` (or a study folder holding one) into a DataFrame.

    Example:
        >>> df = load_trials("results/demo")                     # doctest: +SKIP
        >>> df[df.state == "COMPLETE"].sort_values("score").tail(1)  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        path = path / "trials.csv"
    if not path.is_file():
        raise EvomergeError(f"{path}: no results table; run `evomerge search` first")
    text_cols = ("baseline", "error", "digest", "method", "state")
    df = pd.read_csv(path, keep_default_na=True, dtype={c: str for c in text_cols})
    if "number" in df:
        df["number"] = df["number"].astype("Int64")
    for c in ("baseline", "error", "digest", "method"):
        if c in df:
            df[c] = df[c].fillna("")
    return df


def best_row(df: pd.DataFrame, *, searched_only: bool = True) -> pd.Series | None:
    """The best trial: best holdout among finalists when any was re-scored, else best search score."""
    ok = df[df["state"] == "COMPLETE"]
    if searched_only:
        ok = ok[ok["number"].notna()]
    if ok.empty:
        return None
    scored = ok[ok["holdout"].notna()]
    if not scored.empty:
        return scored.sort_values(["holdout", "score"], ascending=False).iloc[0]
    return ok.sort_values("score", ascending=False).iloc[0]

"""The results table of a study: one row per trial (and per baseline), as ``trials.csv``.

Everything is read back from the Optuna storage, which is the single source of truth, through
:class:`~evomerge.search.records.StudyRecords`. ``trials.csv`` is rewritten (atomically) after every
trial, so it is never half-written and always matches the storage. Several workers of one host
write it in turn (a lock file beside it): each reads the storage after taking the lock, so the last
one to write has read every worker's last commit.

Columns:

- ``number``, ``state``, ``baseline`` (name, empty for searched trials), ``method``;
- ``score``/``score_se`` (aggregate search score), ``s_<task>``/``se_<task>``, ``estimate`` (a
  PRUNED trial: the estimate of its full search score, what the sampler saw, see
  :mod:`evomerge.search.pruning`), ``items`` (search items this row's evaluation scored: all of
  them, fewer for a PRUNED trial, 0 for a trial that took the scores of an earlier one with the
  same tensors);
- ``validation``/``validation_se``, ``v_<task>``, ``validation_items``: the re-score on the
  validation items (every new best, the finalists, hand recipes and baselines);
- ``test``/``test_se``, ``t_<task>``, ``test_items``: the score on the test items, which choose
  nothing (the chosen trial, hand recipes and baselines);
- ``chosen`` (the trial a user gets, :func:`chosen_row`) and, on its row, ``chosen_by`` (the
  items that chose it: ``validation``, ``search``, or ``holdout``: a study made before the
  validation/test split, whose holdout re-scores are shown as validation scores, chose by them);
- ``p_<param>`` (every sampled parameter), ``merge_s``, ``eval_s``, ``wall_s``, ``digest`` (hash of
  the merged tensors), ``retry_of``, ``reused_from``, the flag columns of
  :mod:`evomerge.contamination.rules` with their ``_evidence``, and ``error`` (why a trial failed).
"""

from __future__ import annotations

import fcntl
import math
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.contamination.rules import overfit_columns
from evomerge.errors import EvomergeError, one_line
from evomerge.io import atomic_file
from evomerge.search.records import Scores, StudyRecords

__all__ = ["trials_frame", "write_trials_csv", "load_trials", "chosen_row", "is_number"]


def _score_cols(scores: Scores | None, prefix: str, se_prefix: str, agg: str) -> dict[str, Any]:
    if scores is None:
        return {}
    row: dict[str, Any] = {agg: scores.aggregate, f"{agg}_se": scores.aggregate_se}
    row.update({f"{prefix}{k}": v for k, v in scores.scores.items()})
    if se_prefix:
        row.update({f"{se_prefix}{k}": v for k, v in scores.stderr.items()})
    return row


def _rescore_cols(validation: Scores | None, test: Scores | None) -> dict[str, Any]:
    row = _score_cols(validation, "v_", "", "validation") | _score_cols(test, "t_", "", "test")
    for split, scores in (("validation", validation), ("test", test)):
        row[f"{split}_items"] = (scores.n_items or None) if scores is not None else None
    return row


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
        # A study made before the validation/test split has holdout re-scores, which chose as
        # validation scores do: they are shown as such, and the chosen row says so.
        val = records.rescore(t.number, "validation")
        legacy = val is None and (val := records.rescore(t.number, "holdout")) is not None
        end, start = t.datetime_complete, t.datetime_start
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "baseline": records.baseline_of(t),
            "method": rec.method or "",
            **{f"p_{k}": v for k, v in t.params.items()},
            **_score_cols(rec.search, "s_", "se_", "score"),
            "estimate": rec.estimate,
            **_rescore_cols(val, records.rescore(t.number, "test")),
            "_legacy": legacy,
            "items": rec.search_items,
            "merge_s": rec.merge_s,
            "eval_s": rec.eval_s,
            "wall_s": (end - start).total_seconds() if end and start else None,
            "digest": rec.digest or "",
            "retry_of": records.retry_of(t),
            "reused_from": rec.reused_from,
            "error": rec.error,
        }
        rows.append(row)
    for name, b in records.baselines().items():
        row = {
            "number": None,
            "state": b.state or "COMPLETE",
            "baseline": name,
            "method": b.method or "",
            **_score_cols(b.search, "s_", "se_", "score"),
            **_rescore_cols(b.validation or b.holdout, b.test),
            "items": b.search_items,
            "merge_s": b.merge_s,
            "eval_s": b.eval_s,
            "digest": b.digest or "",
            "error": b.error,
        }
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["number", "state", "baseline", "method"])
    for c in FRONT:
        if c not in df:
            df[c] = math.nan
    for c in ("number", "items", "validation_items", "test_items"):
        df[c] = df[c].astype("Int64")
    chosen = chosen_row(df)
    df["chosen"] = df["number"].eq(chosen["number"]).fillna(False) if chosen is not None else False
    by = ""
    if chosen is not None:
        by = "holdout" if chosen["_legacy"] in (True,) else "search"
        by = by if by == "holdout" or not is_number(chosen["validation"]) else "validation"
    df["chosen_by"] = [by if c else "" for c in df["chosen"]]
    df = df.drop(columns=["_legacy"], errors="ignore")
    # Flags: study-level and source columns hold for every row; overfit per re-scored row, against
    # its test score where it has one (a score that chose nothing), else its validation score.
    for col, val in meta.flags.items():
        df[col] = [val] * len(df)
    over = [_overfit(r) for r in df.to_dict("records")]
    df["overfit"] = [o["overfit"] for o in over]
    df["overfit_evidence"] = [o["overfit_evidence"] for o in over]
    probes = [(records.probe(int(n)) or {}) if n is not pd.NA else {} for n in df["number"]]
    df["memorization_probe"] = [bool(p.get("memorization_probe", False)) for p in probes]
    df["memorization_probe_evidence"] = [p.get("memorization_probe_evidence", "") for p in probes]
    rest = [c for c in df.columns if c not in FRONT]
    prefixes = ("s_", "se_", "v_", "t_")
    order = (
        FRONT
        + sorted([c for c in rest if c.startswith("p_")])
        + sorted([c for c in rest if c.startswith(prefixes)])
        + [c for c in rest if not c.startswith(("p_", *prefixes))]
    )
    return df[order]


FRONT = [
    "number",
    "state",
    "baseline",
    "method",
    "score",
    "score_se",
    "validation",
    "validation_se",
    "test",
    "test_se",
    "items",
    "validation_items",
    "test_items",
]


def _overfit(row: dict[str, Any]) -> dict[str, Any]:
    split = "test" if is_number(row.get("test")) else "validation"
    if not (is_number(row.get(split)) and is_number(row.get("score"))):
        return {"overfit": False, "overfit_evidence": ""}
    return overfit_columns(row["score"], row["score_se"], row[split], row[f"{split}_se"], split)


def is_number(x: Any) -> bool:
    """Whether ``x`` is a number and not NaN (table cells may hold NaN, None or text)."""
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def write_trials_csv(study: Any, path: str | Path) -> pd.DataFrame:
    """Rewrite ``trials.csv`` from the storage, atomically (temp file, then rename), one writer
    of this host at a time.

    Raises:
        EvomergeError: the folder cannot be written (the storage keeps every trial: the table can
            be written again once it can).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            df = trials_frame(study)
            atomic_file(path, lambda f: df.to_csv(f, index=False), mode="w")
    except OSError as e:
        raise EvomergeError(
            f"cannot write the results table {path}: {one_line(e.strerror or e)}; the study's "
            "storage keeps every trial: once the folder is writable, the same search command "
            "writes the table again (and resumes the study)"
        ) from None
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
    text = ("baseline", "error", "digest", "method", "chosen_by")
    df = pd.read_csv(path, keep_default_na=True, dtype={c: str for c in (*text, "state")})
    if "validation" not in df and "holdout" in df:
        # a table written before the validation/test split: its holdout chose, as validation does
        old = ("holdout", "holdout_se", "holdout_items")
        df = df.rename(columns={c: "validation" + c[7:] for c in old})
        df = df.rename(columns=lambda c: f"v_{c[2:]}" if c.startswith("h_") else c)
    if "number" in df:
        df["number"] = df["number"].astype("Int64")
    for c in text:
        if c in df:
            df[c] = df[c].fillna("")
    return df


def chosen_row(df: pd.DataFrame) -> pd.Series | None:
    """The searched trial a user gets (what ``evomerge export`` takes by default): among the
    complete searched trials, the best validation score where any trial was re-scored on the
    validation items (ties: the better search score), else the best search score. The test score
    plays no part: it is the unbiased report of the trial chosen here.

    Returns:
        The chosen row, or None when no searched trial completed.
    """
    ok = df[(df["state"] == "COMPLETE") & df["number"].notna()]
    if ok.empty:
        return None
    val = ok["validation"] if "validation" in ok else pd.Series(math.nan, index=ok.index)
    scored = ok[pd.to_numeric(val, errors="coerce").notna()]
    if not scored.empty:
        return scored.sort_values(
            ["validation", "score", "number"], ascending=[False, False, True]
        ).iloc[0]
    return ok.sort_values(["score", "number"], ascending=[False, True]).iloc[0]

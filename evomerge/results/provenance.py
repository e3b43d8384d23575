"""Which items chose a trial and which scored it, in the words every reader of a study shows.

The export's header, the model card, the leaderboard's summary and the report all say the same
thing about the trial a user gets: what chose it (validation items, or the search items when
there are none; the holdout in a study made before the validation/test split) and its score on
items that chose nothing (the test items), with the item counts, or why there is none.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from evomerge.search.table import chosen_row, is_number

__all__ = ["evaluation_lines", "unseen_score"]


def _n(df: pd.DataFrame, col: str) -> int:
    """Items per evaluation of a split: the most any complete row scored."""
    done = df[df["state"] == "COMPLETE"]
    v: Any = pd.to_numeric(done[col], errors="coerce").max() if col in done and len(done) else None
    return int(v) if is_number(v) else 0


def _on(n: int, what: str) -> str:
    return f" on {n} {what}" if n else ""  # tables of older studies may not count items


def _score(row: Any, col: str) -> str:
    return f"{float(row[col]):.4f} ± {float(row.get(f'{col}_se') or 0):.4f}"


def unseen_score(row: Any) -> tuple[str, float, float] | None:
    """``(split, score, standard error)`` of a row on items the search did not score: its test
    score where it has one, else its validation score; None when it has neither."""
    for split in ("test", "validation"):
        if is_number(row.get(split)):
            return split, float(row[split]), float(row.get(f"{split}_se") or 0.0)
    return None


def evaluation_lines(df: pd.DataFrame, row: Any) -> list[str]:
    """Two or three sentences on one trial of a study's results table ``df``: what chose it and
    what scored it (search, validation and test scores with their item counts).

    Args:
        df: the study's results table (:func:`~evomerge.search.table.trials_frame`).
        row: one searched trial's row of it (the chosen one, or one a user picked).

    Returns:
        Lines of plain text, without bullets or comment marks.
    """
    searched = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
    n_search, n_val, n_test = _n(df, "items"), _n(df, "validation_items"), _n(df, "test_items")
    rescored = searched.get("validation", pd.Series(dtype=float))
    n_rescored = int(pd.to_numeric(rescored, errors="coerce").notna().sum())
    chosen = chosen_row(df)
    number = int(row["number"])
    lines = [f"Search score: {_score(row, 'score')}{_on(n_search, 'search items')}"]
    by = ""
    if chosen is not None and int(chosen["number"]) == number:
        by = str(row.get("chosen_by") or "")
        if by not in ("validation", "search", "holdout"):  # a table without the column
            by = "validation" if is_number(row.get("validation")) else "search"
    if by == "validation":
        lines.append(
            f"Chosen by its validation score {_score(row, 'validation')}{_on(n_val, 'validation items')}, "
            f"the best of the {n_rescored} trials re-scored there (the top trials by search score)"
        )
    elif by == "search":
        why = (
            "the space's holdout has no validation items"
            if n_test
            else "the space has no holdout items"
        )
        lines.append(
            f"Chosen by its search score, the best of {len(searched)} complete trials ({why}): "
            "that score chose it, so it overstates what the model scores on fresh items"
        )
    elif by == "holdout":
        lines.append(
            f"Chosen by its holdout score {_score(row, 'validation')}{_on(n_val, 'holdout items')}, "
            f"the best of {n_rescored} finalists: the study was made before evomerge kept test items "
            "apart, so that score chose the trial and overstates what it scores on fresh items"
        )
    else:
        lines.append(
            f"Chosen by hand (--trial {number}); the study's own choice is trial "
            + (f"{int(chosen['number'])}" if chosen is not None else "none")
        )
        if is_number(row.get("validation")):
            lines.append(
                f"Validation score: {_score(row, 'validation')}{_on(n_val, 'validation items')}"
            )
    if is_number(row.get("test")):
        lines.append(
            f"Test score: {_score(row, 'test')}{_on(n_test, 'test items')}, which chose nothing"
            + (": an unbiased estimate of its score on fresh items of these tasks" if by else "")
        )
    elif by == "holdout":
        lines.append("Test score: none (the study has no test items)")
    elif not n_test:
        lines.append("Test score: none (the space has no test items)")
    elif by:
        lines.append(
            "Test score: not measured yet (the search stopped before its end; the same "
            "`evomerge search` command finishes it)"
        )
    else:
        lines.append(
            "Test score: not measured (the test items score the chosen trial, hand recipes and "
            "baselines only)"
        )
    return lines

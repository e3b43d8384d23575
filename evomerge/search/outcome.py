"""What a finished search reports: counts, the best trial, the baselines and the items evaluated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from evomerge.search.storage import StudyPaths
from evomerge.search.table import chosen_row

__all__ = ["SearchOutcome", "item_totals"]


def item_totals(df: pd.DataFrame) -> dict[str, int]:
    """Items evaluated in a study, from its results table.

    Returns:
        ``trials``: search items scored by searched trials; ``pruned``: the part of those scored
        by trials stopped early; ``all``: with the baselines' and every validation and test
        re-score's items.
    """

    def total(rows: pd.DataFrame, col: str) -> int:
        return int(pd.to_numeric(rows[col], errors="coerce").fillna(0).sum()) if col in rows else 0

    searched = df[df["baseline"] == ""]
    return {
        "trials": total(searched, "items"),
        "pruned": total(searched[searched["state"] == "PRUNED"], "items"),
        "all": total(df, "items") + total(df, "validation_items") + total(df, "test_items"),
    }


@dataclass
class SearchOutcome:
    """What a finished (or resumed-to-completion) search reports."""

    paths: StudyPaths
    n_complete: int
    n_failed: int
    chosen: Mapping[str, Any] | None  # the row of the trial a user gets (export's default)
    baselines: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    n_pruned: int = 0
    items: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_table(cls, paths: StudyPaths, df: pd.DataFrame, seconds: float) -> SearchOutcome:
        """The outcome of a study, read off its results table (every worker's trials)."""
        searched = df[df["baseline"] == ""]
        chosen = chosen_row(df)
        baselines = {r["baseline"]: r for r in df[df["baseline"] != ""].to_dict("records")}
        return cls(
            paths,
            int((searched["state"] == "COMPLETE").sum()),
            int((df["state"] == "FAIL").sum()),
            None if chosen is None else {str(k): v for k, v in chosen.to_dict().items()},
            baselines,
            seconds,
            int((searched["state"] == "PRUNED").sum()),
            item_totals(df),
        )

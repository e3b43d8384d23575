"""The leaderboard and end-of-search summary as a user reads them, for merges and mixtures of experts."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd

from evomerge.results.leaderboard import leaderboard, summary

NAN = math.nan


def _table() -> pd.DataFrame:
    """A study's table as load_trials gives it: a merge trial, a mixture trial (its parameters NaN
    in the other's row, so its whole numbers are floats), and baselines."""
    rows = [
        {
            "number": 0,
            "state": "COMPLETE",
            "baseline": "",
            "method": "moe",
            "score": 0.35,
            "score_se": 0.03,
            "holdout": NAN,
            "s_zoo_rot": 0.35,
            "p_method": "moe",
            "p_moe.gate_mode": "cheap_embed",
            "p_moe.k": 2.0,
            "p_moe.prompts.rot": 15.0,
            "p_moe.use.rot": True,
            "p_moe.use.sort": False,
            "p_lambda": NAN,
            "p_weight.rot": NAN,
            "p_weight.rot.e3": 0.13,
        },
        {
            "number": 1,
            "state": "COMPLETE",
            "baseline": "",
            "method": "task_arithmetic",
            "score": 0.58,
            "score_se": 0.02,
            "holdout": NAN,
            "s_zoo_rot": 0.45,
            "p_method": "task_arithmetic",
            "p_moe.gate_mode": NAN,
            "p_moe.k": NAN,
            "p_moe.prompts.rot": NAN,
            "p_moe.use.rot": NAN,
            "p_moe.use.sort": NAN,
            "p_lambda": 0.6434,
            "p_weight.rot": 1.0,
            "p_weight.rot.e3": NAN,
        },
        {
            "number": 2,
            "state": "COMPLETE",
            "baseline": "source:zoo:demo/rot",
            "method": "linear",
            "score": 0.5,
            "score_se": 0.02,
            "holdout": NAN,
            "s_zoo_rot": 1.0,
        },
    ]
    return pd.DataFrame(rows)


def test_mixture_rows_show_router_experts_per_token_and_experts_first_as_written():
    lines = leaderboard(_table()).splitlines()
    moe = next(ln for ln in lines if ln.strip().startswith("#0"))
    merge = next(ln for ln in lines if ln.strip().startswith("#1"))
    desc = moe.split("  moe ")[1].split()
    assert desc == [
        "moe.gate_mode=cheap_embed",
        "moe.k=2",
        "moe.use.rot=true",
        "moe.use.sort=false",
        "moe.prompts.rot=15",
        "weight.rot.e3=0.13",
    ]
    assert merge.split("task_arithmetic ")[1].split() == [
        "lambda=0.64",
        "weight.rot=1",
    ]  # a mixture's parameters: not in a merge's row


def test_summary_verdict_is_about_sources_and_the_uniform_merge_not_hand_recipes():
    """A hand recipe equal to the best trial (same holdout) does not turn the verdict on sources into a 'does NOT beat'."""
    best = {"number": 3, "method": "task_arithmetic", "score": 0.867, "holdout": 0.95}
    base = {"state": "COMPLETE", "holdout": 0.25, "number": 0}
    outcome = SimpleNamespace(
        paths=SimpleNamespace(name="s", csv="t.csv"),
        n_complete=2,
        n_pruned=0,
        n_failed=0,
        items=None,
        seconds=1.0,
        best=best,
        baselines={
            "source:zoo:demo/base": base,
            "uniform": {**base, "holdout": 0.77, "number": 1},
            "hand:m1": {**base, "holdout": 0.95, "number": 2},
        },
    )
    text = summary(outcome)  # type: ignore[arg-type]
    assert "vs hand:m1" in text and "(+0.000)" in text
    assert (
        text.splitlines()[-1]
        == "the best trial's holdout score beats every source model and the uniform merge"
    )
    outcome.baselines["uniform"] = {**base, "holdout": 0.96, "number": 1}
    assert "does NOT beat" in summary(outcome).splitlines()[-1]  # type: ignore[arg-type]

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


def _study(uniform_test: float) -> tuple[SimpleNamespace, pd.DataFrame]:
    """A finished study's outcome and table: trial 3 chosen on validation items, tested; two
    baselines and a hand recipe with test scores."""
    row = {"state": "COMPLETE", "baseline": "", "items": 300, "chosen": False, "chosen_by": ""}
    chosen = {
        **row,
        "number": 3,
        "method": "task_arithmetic",
        "score": 0.867,
        "score_se": 0.02,
        "validation": 0.9,
        "validation_se": 0.03,
        "validation_items": 150,
        "test": 0.95,
        "test_se": 0.02,
        "test_items": 150,
        "chosen": True,
        "chosen_by": "validation",
    }
    other = {**row, "number": 4, "method": "ties", "score": 0.8, "validation": 0.85, "test": NAN}
    base = {"state": "COMPLETE", "number": NAN, "score": 0.2, "test": 0.25, "validation": 0.2}
    baselines = {
        "source:zoo:demo/base": base,
        "uniform": {**base, "test": uniform_test},
        "hand:m1": {**base, "test": 0.95},
    }
    df = pd.DataFrame([chosen, other] + [{**b, "baseline": k} for k, b in baselines.items()])
    df["number"] = df["number"].astype("Int64")  # as load_trials reads it
    outcome = SimpleNamespace(
        paths=SimpleNamespace(name="s", csv="t.csv"),
        n_complete=2,
        n_pruned=0,
        n_failed=0,
        items=None,
        seconds=1.0,
        chosen=chosen,
        baselines=baselines,
    )
    return outcome, df


def test_summary_compares_the_chosen_trial_on_test_items_with_sources_and_the_uniform_merge():
    """The verdict uses test scores (items that chose nothing) and is about the sources and the
    uniform merge: a hand recipe as good as the chosen trial does not turn it."""
    outcome, df = _study(0.77)
    text = summary(outcome, df)  # type: ignore[arg-type]
    lines = text.splitlines()
    assert "vs hand:m1" in text and "test 0.950  (+0.000)" in text
    assert "  vs uniform                          test 0.770  (+0.180)" in lines
    assert any(
        ln.startswith(
            "  Chosen by its validation score 0.9000 ± 0.0300 on 150 validation items, the best of the 2 trials"
        )
        for ln in lines
    )
    assert "  Test score: 0.9500 ± 0.0200 on 150 test items, which chose nothing" in text
    assert (
        lines[-1]
        == "on the test items, the chosen trial beats every source model and the uniform merge"
    )
    outcome, df = _study(0.96)
    assert "does NOT beat" in summary(outcome, df).splitlines()[-1]  # type: ignore[arg-type]


def test_leaderboard_stars_the_chosen_trial_and_says_what_chose_it():
    _, df = _study(0.77)
    lines = leaderboard(df).splitlines()
    assert next(ln for ln in lines if "task_arithmetic" in ln).lstrip().startswith("#3*")
    assert next(ln for ln in lines if " ties" in ln).lstrip().startswith("#4 ")
    assert "* = the chosen trial (the best valid score; what export takes)" in lines[-1]

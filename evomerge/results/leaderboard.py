"""What a user reads of a study: the leaderboard, and the end-of-search comparison with the baselines."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from evomerge.contamination.render import flag_marks, flag_raised, legend
from evomerge.errors import hide_password
from evomerge.results.provenance import evaluation_lines
from evomerge.search.outcome import SearchOutcome, item_totals
from evomerge.search.storage import load_study, locate
from evomerge.search.table import is_number, trials_frame

__all__ = ["leaderboard", "summary", "main_results", "items_line"]


def leaderboard(df: pd.DataFrame, *, top: int = 15, show_all: bool = False) -> str:
    """The leaderboard text: sorted by search score, baselines marked, flags as letters."""
    view = df if show_all else df[df["state"] == "COMPLETE"]
    view = view.assign(_key=view["score"].fillna(-math.inf)).sort_values(["_key"], ascending=False)
    if not show_all:
        searched = view[view["baseline"] == ""].head(top)
        view = pd.concat([searched, view[view["baseline"] != ""]]).sort_values(
            "_key", ascending=False
        )
    tasks = [c[2:] for c in df.columns if c.startswith("s_")]
    params = sorted(
        (c for c in df.columns if c.startswith("p_") and c != "p_method"), key=_param_order
    )
    head = (
        f"{'trial':>16} {'state':8} {'score':>6} {'±':>5} {'valid':>6} {'test':>6} {'items':>6} "
        + " ".join(f"{t[:10]:>10}" for t in tasks)
        + "  flags  method / params"
    )
    lines = [head, "-" * len(head)]
    for rd in view.to_dict("records"):
        name = f"[{_short_baseline(rd['baseline'])}]" if rd.get("baseline") else f"#{rd['number']}"
        name += "*" if flag_raised(rd.get("chosen")) else ""
        marks = flag_marks(rd)
        desc = str(rd.get("method") or "")
        if not rd.get("baseline"):
            shown = [f"{p[2:]}={v}" for p in params if (v := _param(rd.get(p))) is not None]
            desc += " " + " ".join(shown[:8]) + (" …" if len(shown) > 8 else "")
        if rd.get("state") == "PRUNED" and is_number(rd.get("estimate")):
            desc = f"(estimate {float(rd['estimate']):.3f}) {desc}"  # what the sampler saw of it
        if rd.get("state") != "COMPLETE" and rd.get("error"):
            desc = f"{rd['error']}"[:80]
        lines.append(
            f"{name[:16]:>16} {str(rd['state'])[:8]:8} {_fmt(rd.get('score')):>6} {_fmt(rd.get('score_se')):>5} {_fmt(rd.get('validation')):>6} {_fmt(rd.get('test')):>6} {_count(rd.get('items')):>6} "
            + " ".join(f"{_fmt(rd.get('s_' + t)):>10}" for t in tasks)
            + f"  {marks:5}  {desc}"
        )
    by = list(df.loc[df["chosen"].map(flag_raised), "chosen_by"]) if "chosen" in df else []
    chose = {"validation": "the best valid score", "search": "the best search score"}.get(
        str(by[0]) if by else "",
        "the best valid (holdout) score: this study predates test items",
    )
    lines.append(
        f"* = the chosen trial ({chose}; what export takes); valid: validation items, re-scored "
        "for new bests and finalists to choose; test: items that choose nothing, scored for the "
        "chosen trial, hand recipes and baselines; [name] = baseline (not searched); items: "
        "search items scored. " + legend()
    )
    pruned = df[(df["state"] == "PRUNED") & (df["baseline"] == "")]
    if len(pruned) and not show_all:
        lines.append(
            f"{len(pruned)} trials stopped early (PRUNED, on {_count(pruned['items'].sum())} items; their partial scores: --all)"
        )
    return "\n".join(lines)


def _count(x: Any) -> str:
    return f"{int(x)}" if is_number(x) else "-"


def items_line(df: pd.DataFrame) -> str:
    """One line of the items a study evaluated (search items by trials; in all, with baselines and
    holdout re-scores)."""
    return _items_text(
        item_totals(df), int(((df["state"] == "PRUNED") & (df["baseline"] == "")).sum())
    )


def _items_text(n: dict[str, int], pruned: int) -> str:
    return (
        f"items evaluated: {n['trials']} search items by trials ({n['pruned']} of them by {pruned} trials stopped early), "
        f"{n['all']} in all with baselines and holdout re-scores"
    )


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if not is_number(x):
        return "-"
    return f"{float(x):.{digits}f}"


def _param_order(column: str) -> tuple[int, str]:
    """A mixture's layout first (router, experts per token, which experts take part), then the rest
    by name, so that the eight parameters a row shows say what the candidate is."""
    for rank, prefix in enumerate(("p_moe.gate_mode", "p_moe.k", "p_moe.use.")):
        if column.startswith(prefix):
            return rank, column
    return 3, column


def _param(x: Any) -> str | None:
    """A sampled value as the leaderboard shows it: None when the trial did not sample it, whole
    numbers (experts per token, prompt indices) without decimals, choices as written."""
    if x is None or (isinstance(x, str) and x in ("", "nan")):
        return None
    if isinstance(x, str) or type(x).__name__ in ("bool", "bool_"):
        return str(x).lower() if str(x) in ("True", "False") else str(x)
    if not is_number(x):
        return None
    v = float(x)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.2f}"


def _short_baseline(name: str) -> str:
    kind, _, ref = name.partition(":")
    if kind == "source" and ref:
        return "source:" + ref.rstrip("/").split("/")[-1].split(":")[-1]
    return name


def summary(outcome: SearchOutcome, df: pd.DataFrame) -> str:
    """The end-of-run comparison: the chosen trial against every source model and the uniform
    merge, on the test items (none of which chose anything) where they were scored.

    Args:
        outcome: the finished search.
        df: the study's results table.
    """
    lines = [
        f"study {outcome.paths.name}: {outcome.n_complete} complete trials, {outcome.n_pruned} pruned, {outcome.n_failed} failed, "
        f"{outcome.seconds:.0f}s; table: {outcome.paths.csv}"
    ]
    if outcome.items:
        lines.append(_items_text(outcome.items, outcome.n_pruned))
    best = outcome.chosen
    if best is None:
        return "\n".join(lines + ["no completed trial"])
    lines.append(f"chosen trial #{best['number']} ({best.get('method', '')}):")
    lines += [f"  {line}" for line in evaluation_lines(df, best)]
    key = "test" if is_number(best.get("test")) else "score"
    bval = float(best[key])
    where = "test" if key == "test" else "search (they chose the trial: the comparison favours it)"
    beaten_all = True
    for name, b in outcome.baselines.items():
        if b.get("state") != "COMPLETE":
            lines.append(f"  vs {name:<32} (failed: {b.get('error', '')})")
            continue
        r: Any = b.get(key)
        if not is_number(r):
            lines.append(f"  vs {name:<32} ({key} not measured)")
            continue
        diff = bval - float(r)
        if name == "uniform" or name.startswith("source:"):
            # what the verdict below is about; hand recipes are listed only
            beaten_all &= diff > 0
        lines.append(
            f"  vs {name:<32} {key} {float(r):.3f}  ({'+' if diff >= 0 else ''}{diff:.3f})"
        )
    # a data-flow space over models of different depths has no uniform merge
    uniform = " and the uniform merge" if "uniform" in outcome.baselines else ""
    lines.append(
        f"on the {where} items, the chosen trial {'beats' if beaten_all else 'does NOT beat'} "
        f"every source model{uniform}"
    )
    return "\n".join(lines)


def main_results(
    space: str,
    *,
    study: str | None = None,
    storage: str | None = None,
    results_dir: str = "results",
    top: int = 15,
    show_all: bool = False,
) -> int:
    """``evomerge results space.yml``: print the leaderboard of the space's study."""
    paths = locate(space, study=study, storage=storage, results_dir=results_dir)
    df = trials_frame(load_study(paths))
    print(
        f"study {paths.name} ({hide_password(paths.storage)}): {int((df['state'] == 'COMPLETE').sum())} complete rows, "
        f"{int((df['state'] == 'PRUNED').sum())} pruned, {int((df['state'] == 'FAIL').sum())} failed"
    )
    print(items_line(df))
    print(leaderboard(df, top=top, show_all=show_all))
    return 0

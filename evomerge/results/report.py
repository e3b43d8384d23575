"""``evomerge report``: PNG plots and a markdown summary of a study's results table.

:func:`make_report` works on the results table alone (the ``trials.csv`` schema of
:mod:`evomerge.search.table`), so it can be used on any saved table::

    from evomerge.results.report import make_report
    from evomerge.search.table import load_trials
    make_report(load_trials("results/demo"), Path("results/demo/report"), study_name="demo")

It writes, always (a figure says why when there is nothing to draw):

``history.png``
    Objective of every completed searched trial (dots), the best so far (step line),
    baselines as labelled horizontal dashed lines, failed trials as ``x`` at the bottom.
``importance.png``
    Parameter importances: Optuna's fANOVA (:func:`optuna.importance.get_param_importances`)
    when a study is given, else |Spearman rank correlation| of every numeric ``p_*`` column
    with the objective over completed searched trials (a monotone-association screen, not a
    variance decomposition; categorical parameters are left out). The title says which.
``parallel.png``
    Parallel coordinates of the top trials, every parameter scaled to [0, 1] over the range
    the completed trials explored (categories: their sorted order), coloured by objective.
``holdout.png``
    Search score vs the score on unseen items of the rows that have one: test items (the
    chosen trial, hand recipes, baselines), else validation items (finalists), with standard
    errors and the diagonal; ``overfit``-flagged rows in red.
``flags.png``
    How many rows raise each flag of :mod:`evomerge.contamination.rules`.
``report.md``
    Links to the figures, the top trials with their flag letters, which items chose the chosen
    trial and which scored it, the legend and the evidence of every raised flag.

Every file is written to a temporary name and moved into place, never half-written.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.contamination.render import flag_marks, flag_raised, legend
from evomerge.contamination.rules import FLAG_COLUMNS
from evomerge.errors import EvomergeError
from evomerge.io import atomic_file
from evomerge.results.provenance import evaluation_lines
from evomerge.search.storage import load_study, locate
from evomerge.search.table import chosen_row, trials_frame

__all__ = ["make_report", "param_importances", "main_report"]

_BAD, _OK, _BASE = "#d62728", "#1f77b4", "#2ca02c"
_LINES = ("#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")  # no red


def _save(fig: Any, path: Path) -> Path:
    return atomic_file(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def _figure(w: float = 7.0, h: float = 4.2) -> Any:
    # The object API with the Agg canvas: no pyplot global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _message(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _col(df: pd.DataFrame, name: str, default: Any = math.nan) -> pd.Series:
    return df[name] if name in df else pd.Series([default] * len(df), index=df.index)


def _baseline_mask(df: pd.DataFrame) -> pd.Series:
    return _col(df, "baseline", "").fillna("").astype(str).str.len() > 0


def _searched_complete(df: pd.DataFrame, obj: str) -> pd.DataFrame:
    ok = (_col(df, "state", "") == "COMPLETE") & ~_baseline_mask(df)
    out = df[ok].copy()
    out["_obj"] = pd.to_numeric(_col(out, obj), errors="coerce")
    return out[out["_obj"].notna()]


def _short(baseline: str) -> str:
    """``source:/long/path/to/model`` -> ``source:model`` (legends and labels)."""
    kind, _, ref = baseline.partition(":")
    return f"source:{Path(ref.rstrip('/')).name}" if kind == "source" and ref else baseline


def _param_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("p_") and df[c].notna().any()]


def param_importances(
    df: pd.DataFrame, objective: str = "score", *, study: Any = None
) -> tuple[dict[str, float], str]:
    """Importance of every sampled parameter for the objective.

    Args:
        df: the results table.
        objective: the objective column.
        study: an Optuna study; when given, its fANOVA importances are used.
    Returns:
        ``({p_column: importance}, method)`` sorted by importance; ``method`` names what was
        computed. Empty when fewer than 3 usable trials or no parameters.
    """
    if study is not None:
        try:
            from optuna.importance import FanovaImportanceEvaluator, get_param_importances

            multi = len(study.directions) > 1
            imp = get_param_importances(
                study,
                evaluator=FanovaImportanceEvaluator(seed=0),
                target=(lambda t: t.values[0]) if multi else None,
            )
            if imp:  # an empty study gives {}: then the table is all there is
                return {f"p_{k}": float(v) for k, v in imp.items()}, "Optuna fANOVA"
        except (RuntimeError, ValueError):  # too few trials, dynamic spaces: use the table
            pass
    done = _searched_complete(df, objective)
    out: dict[str, float] = {}
    if len(done) >= 3:
        for c in _param_cols(done):
            x = pd.to_numeric(done[c], errors="coerce")
            if x.notna().sum() < done[c].notna().sum():  # categorical: no order to correlate
                continue
            keep = x.notna()
            x, y = x[keep].astype(float), done["_obj"][keep]
            if len(x) >= 3 and x.nunique() > 1 and y.nunique() > 1:
                # Spearman = Pearson on ranks (pandas' own spearman would need scipy)
                out[c] = abs(float(x.rank().corr(y.rank())))
    ranked = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    return ranked, "|Spearman rank correlation| with the objective"


def _history(df: pd.DataFrame, objectives: Sequence[str], path: Path) -> Path:
    fig = _figure(7.5, 3.6 * len(objectives))
    axes = fig.subplots(len(objectives), 1, squeeze=False)[:, 0]
    for ax, obj in zip(axes, objectives, strict=True):
        done = _searched_complete(df, obj).sort_values("number")
        base = df[_baseline_mask(df) & (_col(df, "state", "") == "COMPLETE")]
        base_y = pd.to_numeric(_col(base, obj), errors="coerce")
        failed = df[(_col(df, "state", "") == "FAIL") & ~_baseline_mask(df)]
        if done.empty and base_y.isna().all():
            _message(ax, f"no completed trial has a {obj!r} yet ({len(failed)} failed)")
            continue
        x = done["number"].astype(float)
        ax.scatter(x, done["_obj"], s=18, color=_OK, label="trial", zorder=3)
        ax.step(x, done["_obj"].cummax(), where="post", color="black", lw=1.2, label="best so far")
        for i, (name, y) in enumerate(zip(base["baseline"], base_y, strict=True)):
            if math.isfinite(y):
                ax.axhline(
                    y,
                    ls="--",
                    lw=1,
                    color=_LINES[i % len(_LINES)],
                    label=f"baseline {_short(name)}",
                )
        lo = min([v for v in [done["_obj"].min(), base_y.min()] if pd.notna(v)])
        if len(failed):
            ax.scatter(
                failed["number"].astype(float),
                [lo] * len(failed),
                marker="x",
                color=_BAD,
                s=30,
                label=f"failed ({len(failed)})",
                zorder=3,
            )
        ax.set_xlabel("trial")
        ax.set_ylabel(obj)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_title("Optimization history")
    return _save(fig, path)


def _importance(imp: dict[str, float], method: str, path: Path) -> Path:
    fig = _figure(6.5, 0.6 + 0.3 * max(len(imp), 3))
    ax = fig.subplots()
    if not imp:
        _message(
            ax, "no parameter importances: no sampled parameters, or fewer than 3 completed trials"
        )
    else:
        names = list(imp)[::-1]
        ax.barh([n[2:] for n in names], [imp[n] for n in names], color=_OK)
        ax.set_xlabel("importance")
    ax.set_title(f"Parameter importances ({method})", fontsize=9)
    return _save(fig, path)


def _parallel(
    df: pd.DataFrame, obj: str, imp: dict[str, float], top: int, path: Path, max_axes: int = 12
) -> Path:
    fig = _figure(8.0, 4.2)
    ax = fig.subplots()
    done = _searched_complete(df, obj)
    cols = _param_cols(done)
    if done.empty or not cols:
        _message(
            ax, "no completed trials" if done.empty else "no sampled parameters (a one-point space)"
        )
        return _save(fig, path)
    # The most important parameters first; the rest dropped when there are too many.
    cols = sorted(cols, key=lambda c: (-imp.get(c, -1.0), c))[:max_axes]
    scaled = pd.DataFrame(index=done.index)
    for c in cols:
        num = pd.to_numeric(done[c], errors="coerce")
        if pd.api.types.is_bool_dtype(
            num
        ):  # whether a mixture's expert takes part, in a study of mixtures only
            num = num.astype(float)
        if num.notna().sum() < done[c].notna().sum():  # categorical: its sorted order
            cats = sorted(done[c].dropna().astype(str).unique())
            num = done[c].map(lambda v, cats=cats: cats.index(str(v)) if pd.notna(v) else math.nan)
        span = num.max() - num.min()
        scaled[c] = (num - num.min()) / span if span > 0 else 0.5
    best = done.sort_values("_obj", ascending=False).head(top)
    import matplotlib as mpl

    norm = mpl.colors.Normalize(best["_obj"].min(), best["_obj"].max())
    cmap = mpl.colormaps["viridis"]
    for idx in best.index[::-1]:  # best drawn last, on top
        ax.plot(
            range(len(cols)),
            scaled.loc[idx, cols].astype(float),
            marker="o",
            ms=3,
            color=cmap(norm(best.loc[idx, "_obj"])),
            lw=1.4,
        )
    ax.set_xticks(range(len(cols)), [c[2:] for c in cols], rotation=35, ha="right", fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("scaled to the explored range")
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=obj)
    more = (
        f", {len(_param_cols(done)) - len(cols)} parameters not shown"
        if len(_param_cols(done)) > len(cols)
        else ""
    )
    ax.set_title(f"Top {len(best)} trials by {obj}{more}", fontsize=9)
    return _save(fig, path)


def _holdout(df: pd.DataFrame, path: Path) -> Path:
    fig = _figure(5.2, 5.0)
    ax = fig.subplots()
    # Each row at its score on unseen items: test where it has one (the chosen trial, hand
    # recipes, baselines), else validation (new bests and finalists).
    s = pd.to_numeric(_col(df, "score"), errors="coerce")
    t = pd.to_numeric(_col(df, "test"), errors="coerce")
    v = pd.to_numeric(_col(df, "validation"), errors="coerce")
    h = t.where(t.notna(), v)
    se = pd.to_numeric(_col(df, "test_se"), errors="coerce").where(
        t.notna(), pd.to_numeric(_col(df, "validation_se"), errors="coerce")
    )
    rows = df[s.notna() & h.notna()]
    if rows.empty:
        _message(
            ax, "no validation or test scores (re-scored: finalists, the chosen trial, baselines)"
        )
        return _save(fig, path)
    s, h, tested = s[rows.index], h[rows.index], t[rows.index].notna()
    se_s = pd.to_numeric(_col(rows, "score_se"), errors="coerce").fillna(0)
    se_h = se[rows.index].fillna(0)
    over = _col(rows, "overfit", False).map(flag_raised)
    is_base = _baseline_mask(rows)
    for mask, color, marker, label in (
        (~over & ~is_base & ~tested, _OK, "o", "validation (finalists)"),
        (~over & ~is_base & tested, _OK, "*", "test (the chosen trial, hand recipes)"),
        (~over & is_base, _BASE, "s", "test (baselines)"),
        (over, _BAD, "D", "overfit flagged"),
    ):
        if mask.any():
            ax.errorbar(
                s[mask],
                h[mask],
                xerr=se_s[mask],
                yerr=se_h[mask],
                fmt=marker,
                color=color,
                ms=5,
                capsize=2,
                lw=0.8,
                label=label,
            )
    for i in rows.index:
        name = _short(str(rows.at[i, "baseline"])) if is_base[i] else f"#{rows.at[i, 'number']}"
        ax.annotate(name, (s[i], h[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    lo, hi = min(s.min(), h.min()), max(s.max(), h.max())
    pad = (hi - lo) * 0.08 or 0.05
    ax.plot(
        [lo - pad, hi + pad],
        [lo - pad, hi + pad],
        ls=":",
        color="gray",
        lw=1,
        label="search = unseen",
    )
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("search score")
    ax.set_ylabel("score on unseen items (test, else validation)")
    ax.set_title("Search vs unseen items (below the diagonal: worse on unseen items)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _flag_counts(df: pd.DataFrame) -> dict[str, int]:
    return {c: int(df[c].map(flag_raised).sum()) for c in FLAG_COLUMNS if c in df}


def _flags(df: pd.DataFrame, path: Path) -> Path:
    fig = _figure(6.5, 2.8)
    ax = fig.subplots()
    counts = _flag_counts(df)
    if not counts:
        _message(ax, "no flag columns in the results table")
    else:
        names = list(counts)[::-1]
        ax.barh(
            names,
            [counts[n] for n in names],
            color=[_BAD if counts[n] else "lightgray" for n in names],
        )
        for y, n in enumerate(names):
            ax.text(counts[n], y, f" {counts[n]}/{len(df)}", va="center", fontsize=8)
        ax.set_xlim(0, max(len(df), 1) * 1.15)
        ax.set_xlabel("rows raising the flag")
    ax.set_title("Contamination and overfitting flags", fontsize=9)
    return _save(fig, path)


def _fmt_param(v: Any) -> str:
    """A sampled value: whole numbers (a mixture's experts per token, prompt indices) without decimals."""
    if not isinstance(v, (bool, str)) and isinstance(v, (int, float)) and float(v).is_integer():
        return str(int(v))
    return _fmt(v, 3)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, str)):
        return str(v)
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def _markdown(
    df: pd.DataFrame, study_name: str, obj: str, imp_method: str, pngs: list[Path], top: int
) -> str:
    state = _col(df, "state", "")
    searched = ~_baseline_mask(df)
    lines = [
        f"# evomerge report: {study_name}",
        "",
        f"{int((searched & (state == 'COMPLETE')).sum())} completed, "
        f"{int((searched & (state == 'FAIL')).sum())} failed, "
        f"{int((searched & (state == 'RUNNING')).sum())} running searched trials; "
        f"{int((~searched).sum())} baselines. Objective: `{obj}` (higher is better).",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in pngs]
    lines += ["", f"Parameter importances: {imp_method}.", "", f"## Top trials by {obj}", ""]
    done = df[(state == "COMPLETE")].assign(_obj=pd.to_numeric(_col(df, obj), errors="coerce"))
    best = done[done["_obj"].notna()].sort_values("_obj", ascending=False).head(top)
    params = [c for c in _param_cols(df) if c != "p_method"]  # already in its own column
    if best.empty:
        lines.append("No completed trials.")
    else:
        lines += [
            "| trial | score | ± | validation | test | flags | method | parameters |",
            "|---|---|---|---|---|---|---|---|",
        ]
        chosen = chosen_row(df)
        for _, r in best.iterrows():
            name = f"[{r['baseline']}]" if str(r.get("baseline") or "") else f"#{r['number']}"
            if chosen is not None and not r.get("baseline") and r["number"] == chosen["number"]:
                name += " (chosen)"
            ps = " ".join(f"{c[2:]}={_fmt_param(r[c])}" for c in params if pd.notna(r.get(c)))
            lines.append(
                f"| {name} | {_fmt(r.get(obj))} | {_fmt(r.get(obj + '_se'))} | "
                f"{_fmt(r.get('validation'))} | {_fmt(r.get('test'))} | "
                f"{flag_marks(r.to_dict()) or '-'} | "
                f"{r.get('method') or ''} | {ps.replace('|', '/')} |"
            )
    chosen = chosen_row(df)
    if chosen is not None:
        lines += ["", f"## The chosen trial: #{chosen['number']}", ""]
        lines += [f"- {line}." for line in evaluation_lines(df, chosen)]
    lines += ["", "## Flags", "", legend(), ""]
    counts = _flag_counts(df)
    for c, n in counts.items():
        if not n:
            lines.append(f"- `{c}`: not raised")
            continue
        ev = _col(df, f"{c}_evidence", "")[df[c].map(flag_raised)].fillna("").astype(str)
        uniq = list(dict.fromkeys(e for e in ev if e))
        lines.append(f"- `{c}`: **raised** on {n} of {len(df)} rows" + (":" if uniq else ""))
        lines += [f"  - {e}" for e in uniq[:10]] + (
            [f"  - ... {len(uniq) - 10} more"] if len(uniq) > 10 else []
        )
    if not counts:
        lines.append("The results table has no flag columns.")
    lines += ["", "A raised flag marks a risk, with its evidence; it is not a proof."]
    return "\n".join(lines) + "\n"


def make_report(
    df: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str,
    objective_columns: Sequence[str] | None = None,
    study: Any = None,
    top: int = 10,
) -> list[Path]:
    """Write the report figures and ``report.md`` of a results table into ``out_dir``.

    Args:
        df: the results table (``trials.csv`` schema, see :mod:`evomerge.search.table`).
        out_dir: the folder to write into (created if missing).
        study_name: shown in the report title.
        objective_columns: columns to plot as objectives (higher is better); default
            ``["score"]``. The first drives the importances, the top trials and the ranking.
        study: the Optuna study, for fANOVA importances; ``None``: a Spearman screen.
        top: how many trials the parallel-coordinates plot and the table show.
    Returns:
        The written paths: ``history.png``, ``importance.png``, ``parallel.png``,
        ``holdout.png``, ``flags.png`` and ``report.md``.
    Raises:
        ValueError: an objective column that the table does not have.
    """
    objectives = list(objective_columns or ["score"])
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ValueError(
            f"objective column(s) {missing} not in the results table "
            f"(columns: {', '.join(map(str, df.columns))})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = objectives[0]
    imp, method = param_importances(df, obj, study=study)
    pngs = [
        _history(df, objectives, out_dir / "history.png"),
        _importance(imp, method, out_dir / "importance.png"),
        _parallel(df, obj, imp, top, out_dir / "parallel.png"),
        _holdout(df, out_dir / "holdout.png"),
        _flags(df, out_dir / "flags.png"),
    ]
    text = _markdown(df, study_name, obj, method, pngs, top)
    md = atomic_file(out_dir / "report.md", lambda f: f.write(text), mode="w")
    return [*pngs, md]


def main_report(args: Any) -> int:
    """``evomerge report space.yml``: write the report of the space's study.

    Args:
        args: argparse namespace with ``space``, ``study``, ``storage`` (and optionally
            ``results_dir``, ``out``).
    Returns:
        0 on success.

    Raises:
        EvomergeError: matplotlib is not installed (the ``report`` extra).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise EvomergeError(
            "evomerge report draws with matplotlib, which is not installed: pip install 'evomerge[report]'"
        )
    paths = locate(
        args.space,
        study=getattr(args, "study", None),
        storage=getattr(args, "storage", None),
        results_dir=getattr(args, "results_dir", None) or "results",
    )
    study = load_study(paths)
    out = Path(getattr(args, "out", None) or paths.folder / "report")
    written = make_report(trials_frame(study), out, study_name=paths.name, study=study)
    print(f"report of study {paths.name}: {written[-1]} ({len(written) - 1} figures)")
    return 0

"""The results table of a study: one row per trial (and per baseline), as ``trials.csv``.

Everything is read back from the Optuna storage, which is the single source of truth: trial
user attributes hold each trial's scores and timings, the study's user attributes hold the
baselines, the holdout re-scores and the study-level flags. ``trials.csv`` is rewritten
(atomically) after every trial, so it is never half-written and always matches the storage.

Columns: ``number``, ``state``, ``baseline`` (name, empty for searched trials), ``method``,
``p_<param>`` (every sampled parameter), ``score``/``score_se`` (aggregate search score),
``s_<task>``/``se_<task>``, ``holdout``/``holdout_se``, ``h_<task>``, ``merge_s``, ``eval_s``,
``digest`` (hash of the merged tensors), the flag columns of :mod:`evomerge.contamination.flags` with their
``_evidence``, and ``error`` (why a trial failed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from evomerge.errors import EvomergeError, one_line
from evomerge.io import atomic_file

__all__ = ["StudyPaths", "study_paths", "open_storage", "load_study", "trials_frame", "write_trials_csv", "load_trials", "leaderboard", "main_results", "best_row"]


@dataclass(frozen=True)
class StudyPaths:
    """Where a study lives: its name, its folder and its storage URL."""

    name: str
    folder: Path
    storage: str
    default_storage: bool

    @property
    def csv(self) -> Path:
        return self.folder / "trials.csv"


def study_paths(space_file: str | Path, *, study: str | None = None, space_study: str | None = None,
                storage: str | None = None, space_storage: str | None = None, results_dir: str | Path = "results") -> StudyPaths:
    """Resolve the study name (``--study`` > ``study.name`` > the space's file name), its
    folder ``results/<study>/`` and its storage (``--storage`` > ``study.storage`` > SQLite in
    the folder)."""
    name = study or space_study or re.sub(r"[^\w.-]+", "_", Path(space_file).stem)
    folder = Path(results_dir) / name
    url = storage or space_storage
    default = url is None
    if default:
        url = f"sqlite:///{(folder / 'study.db').resolve()}"
    return StudyPaths(name, folder, url, default)


def open_storage(url: str, *, field: str = "--storage") -> Any:
    """An Optuna storage for ``url``; a clear error when it cannot be reached.

    Raises:
        EvomergeError: the URL is malformed or the database cannot be opened.
    """
    import optuna

    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise EvomergeError(f"{field}: cannot open storage {url}: folder {folder} does not exist")
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else {"connect_args": {"timeout": 60}})
    except Exception as e:  # sqlalchemy raises many types here
        raise EvomergeError(f"{field}: cannot open storage {url}: {one_line(type(e).__name__)}: {one_line(e)[:200]}") from None
    if url.startswith("sqlite"):
        _fast_sqlite(storage.engine)
    return storage


def _fast_sqlite(engine: Any) -> None:
    """WAL journal with synchronous=NORMAL: a commit no longer waits for an fsync (a dozen per
    trial otherwise cost ~10 ms each), and a killed process still loses nothing committed."""
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened before the listener get the pragmas too


def load_study(paths: StudyPaths) -> Any:
    """The existing study at ``paths`` (for results/export/report).

    Raises:
        EvomergeError: there is no such study yet.
    """
    import optuna

    if paths.default_storage and not (paths.folder / "study.db").is_file():
        raise EvomergeError(f"no study {paths.name!r} yet ({paths.folder / 'study.db'} does not exist); run `evomerge search` on the space first")
    storage = open_storage(paths.storage)
    try:
        return optuna.load_study(study_name=paths.name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise EvomergeError(f"no study {paths.name!r} in {paths.storage}" + (f" (it has: {', '.join(names)})" if names else "")) from None


def _task_cols(prefix: str, d: Mapping[str, float] | None) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in (d or {}).items()}


def _row_from_result(res: Mapping[str, Any] | None, score_prefix: str, se_prefix: str, agg: str) -> dict[str, Any]:
    if not res:
        return {}
    row = {agg: res.get("aggregate"), f"{agg}_se": res.get("aggregate_se")}
    row.update(_task_cols(score_prefix, res.get("scores")))
    if se_prefix:
        row.update(_task_cols(se_prefix, res.get("stderr")))
    return row


def trials_frame(study: Any) -> pd.DataFrame:
    """The results table of ``study``: searched trials, then baselines.

    Returns:
        A DataFrame with the columns described in the module docstring.
    """
    from evomerge.contamination import flags

    attrs = dict(study.user_attrs)
    study_flags = attrs.get("flags", {})
    rows: list[dict[str, Any]] = []
    for t in study.get_trials(deepcopy=False):
        ua = {**(t.user_attrs.get("result") or {}), "baseline": t.user_attrs.get("baseline", ""), "retry_of": t.user_attrs.get("retry_of")}
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "baseline": ua.get("baseline", ""), "method": ua.get("method", "")}
        row.update({f"p_{k}": v for k, v in t.params.items()})
        row.update(_row_from_result(ua.get("search"), "s_", "se_", "score"))
        row.update(_row_from_result(attrs.get(f"holdout:{t.number}"), "h_", "", "holdout"))
        wall = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        row.update({"merge_s": ua.get("merge_s"), "eval_s": ua.get("eval_s"), "wall_s": wall, "digest": ua.get("digest", ""),
                    "retry_of": ua.get("retry_of"), "error": ua.get("error", "")})
        rows.append(row)
    for key in sorted(k for k in attrs if k.startswith("baseline:")):
        b = attrs[key]
        row = {"number": None, "state": b.get("state", "COMPLETE"), "baseline": key.split(":", 1)[1], "method": b.get("method", "")}
        row.update(_row_from_result(b.get("search"), "s_", "se_", "score"))
        row.update(_row_from_result(b.get("holdout"), "h_", "", "holdout"))
        row.update({"merge_s": b.get("merge_s"), "eval_s": b.get("eval_s"), "digest": b.get("digest", ""), "error": b.get("error", "")})
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["number", "state", "baseline", "method", "score", "holdout"])
    for c in ("score", "score_se", "holdout", "holdout_se"):
        if c not in df:
            df[c] = math.nan
    df["number"] = df["number"].astype("Int64")
    # Flags: study-level and source columns hold for every row; overfit per scored finalist.
    for col, val in study_flags.items():
        df[col] = [val] * len(df)
    over = [flags.overfit_columns(r.score, r.score_se, r.holdout, r.holdout_se) if _num(r.holdout) and _num(r.score) else {"overfit": False, "overfit_evidence": ""}
            for r in df.itertuples()]
    df["overfit"] = [o["overfit"] for o in over]
    df["overfit_evidence"] = [o["overfit_evidence"] for o in over]
    probes = {int(k.split(":", 1)[1]): v for k, v in attrs.items() if k.startswith("probe:")}
    df["memorization_probe"] = [bool(probes.get(n, {}).get("memorization_probe", False)) if n is not pd.NA else False for n in df["number"]]
    df["memorization_probe_evidence"] = [probes.get(n, {}).get("memorization_probe_evidence", "") if n is not pd.NA else "" for n in df["number"]]
    front = ["number", "state", "baseline", "method", "score", "score_se", "holdout", "holdout_se"]
    rest = [c for c in df.columns if c not in front]
    order = front + sorted([c for c in rest if c.startswith("p_")]) + sorted([c for c in rest if c.startswith(("s_", "se_", "h_"))]) + \
        [c for c in rest if not c.startswith(("p_", "s_", "se_", "h_"))]
    return df[order]


def _num(x: Any) -> bool:
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def write_trials_csv(study: Any, path: str | Path) -> pd.DataFrame:
    """Rewrite ``trials.csv`` from the storage, atomically (temp file, then rename)."""
    df = trials_frame(study)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def leaderboard(df: pd.DataFrame, *, top: int = 15, show_all: bool = False) -> str:
    """The leaderboard text: sorted by search score, baselines marked, flags as letters."""
    from evomerge.contamination import flags

    view = df if show_all else df[df["state"] == "COMPLETE"]
    view = view.assign(_key=view["score"].fillna(-math.inf)).sort_values(["_key"], ascending=False)
    if not show_all:
        searched = view[view["baseline"] == ""].head(top)
        view = pd.concat([searched, view[view["baseline"] != ""]]).sort_values("_key", ascending=False)
    tasks = [c[2:] for c in df.columns if c.startswith("s_")]
    params = [c for c in df.columns if c.startswith("p_") and c != "p_method"]
    head = f"{'trial':>16} {'state':8} {'score':>6} {'±':>5} {'holdout':>7} " + " ".join(f"{t[:10]:>10}" for t in tasks) + "  flags  method / params"
    lines = [head, "-" * len(head)]
    for rd in view.to_dict("records"):
        name = f"[{_short_baseline(rd['baseline'])}]" if rd.get("baseline") else f"#{rd['number']}"
        marks = flags.flag_marks(rd)
        desc = str(rd.get("method") or "")
        if not rd.get("baseline"):
            shown = [f"{p[2:]}={_fmt(rd.get(p), 2)}" for p in params if _num(rd.get(p))]
            desc += " " + " ".join(shown[:8]) + (" …" if len(shown) > 8 else "")
        if rd.get("state") != "COMPLETE" and rd.get("error"):
            desc = f"{rd['error']}"[:80]
        lines.append(f"{name[:16]:>16} {str(rd['state'])[:8]:8} {_fmt(rd.get('score')):>6} {_fmt(rd.get('score_se')):>5} {_fmt(rd.get('holdout')):>7} "
                     + " ".join(f"{_fmt(rd.get('s_' + t)):>10}" for t in tasks) + f"  {marks:5}  {desc}")
    lines.append("[name] = baseline (not searched); holdout only for finalists and baselines. " + flags.legend())
    return "\n".join(lines)


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if not _num(x):
        return "-"
    return f"{float(x):.{digits}f}"


def _short_baseline(name: str) -> str:
    kind, _, ref = name.partition(":")
    if kind == "source" and ref:
        return "source:" + ref.rstrip("/").split("/")[-1].split(":")[-1]
    return name


def main_results(args: Any) -> int:
    """``evomerge results space.yml``: print the leaderboard of the space's study."""
    from evomerge.space.space import load_space

    space = load_space(args.space)
    paths = study_paths(args.space, study=args.study, space_study=space.study_name, storage=args.storage,
                        space_storage=space.storage, results_dir=args.results_dir)
    study = load_study(paths)
    df = trials_frame(study)
    print(f"study {paths.name} ({paths.storage}): {int((df['state'] == 'COMPLETE').sum())} complete rows, "
          f"{int((df['state'] == 'FAIL').sum())} failed")
    print(leaderboard(df, top=args.top, show_all=args.all))
    return 0

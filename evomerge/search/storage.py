"""Where a study lives: its name, its folder under ``results/`` and its Optuna storage.

The default storage is an SQLite file in the study's folder, with a WAL journal; ``--storage URL``
(or the space's ``study.storage``) takes any Optuna RDB URL (``postgresql://``, ``mysql+pymysql://``,
``sqlite:///``), or ``journal:///path/study.log`` for Optuna's journal file storage (a relative
path; ``journal:////abs/study.log`` for an absolute one, as with ``sqlite:``). Several workers
may share one storage (see :mod:`evomerge.search.distributed`):

- RDB storages record a heartbeat per running trial (``liveness``), so that a live worker on any
  host can fail the trial of a dead one.
- SQLite runs every transaction of a search as ``BEGIN IMMEDIATE``: a read-then-write (Optuna popping a queued
  trial, failing a stale one) holds the write lock from its first read, as PostgreSQL's ``SELECT ...
  FOR UPDATE`` does, instead of two processes both reading "waiting" and both running the trial.
- The journal file has no heartbeat: a dead worker is recognised by its pid, on its own host only.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, hide_password, one_line
from evomerge.io import plain_name
from evomerge.search.distributed.claims import is_claim
from evomerge.search.distributed.liveness import Liveness
from evomerge.space import load_space

__all__ = ["StudyPaths", "study_paths", "open_storage", "load_study", "locate"]

# What to install for a storage URL's database (SQLAlchemy 2 maps postgresql:// to psycopg 3).
_DRIVERS = {
    "postgresql": "'psycopg[binary]'",
    "mysql": "pymysql (and write the URL as mysql+pymysql://)",
}


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


def study_paths(
    space_file: str | Path,
    *,
    study: str | None = None,
    space_study: str | None = None,
    storage: str | None = None,
    space_storage: str | None = None,
    results_dir: str | Path = "results",
) -> StudyPaths:
    """Resolve the study name (``--study`` > ``study.name`` > the space's file name), its
    folder ``results/<study>/`` and its storage (``--storage`` > ``study.storage`` > SQLite in
    the folder).

    Raises:
        ConfigError: a name that is not a plain name (:func:`~evomerge.io.plain_name`): one that
            would put the study's folder outside ``results_dir`` (``../x``, ``/abs``, ``a/b``),
            a hidden one, or one with characters a URL would read.
    """
    if study is not None:
        name = plain_name(study, None, "--study")
    elif space_study is not None:
        name = plain_name(space_study, str(space_file), "study.name")
    else:  # the file name, made plain: `my space.yml` -> my_space, `.hidden.yml` -> hidden
        stem = re.sub(r"[^\w.-]+", "_", Path(space_file).stem).lstrip(".-")
        name = plain_name(stem[:128] or "space", str(space_file), "the space's file name")
    folder = Path(results_dir) / name
    url = storage or space_storage
    if url is None:
        return StudyPaths(name, folder, f"sqlite:///{(folder / 'study.db').resolve()}", True)
    return StudyPaths(name, folder, url, False)


JOURNAL = "journal:///"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec (None: an import that is blocked)
        return sys.modules.get(module) is not None


def _sqlalchemy_url(url: str) -> str:
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, 2.0 to psycopg2: use whichever is installed.
    if url.startswith("postgresql://") and not _installed("psycopg2") and _installed("psycopg"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def open_storage(
    url: str,
    *,
    field: str = "--storage",
    liveness: Liveness | None = None,
    on_stale: Callable[[Any, Any], None] | None = None,
) -> Any:
    """An Optuna storage for ``url``; a clear error when it cannot be reached.

    Args:
        url: an Optuna RDB URL, or ``journal:///path`` for a journal file (four slashes for an
            absolute path, as in ``sqlite:////``).
        field: the option or key the URL came from (for messages).
        liveness: record heartbeats of running trials (RDB storages) with these intervals; None
            for readers.
        on_stale: called as ``on_stale(study, frozen_trial)`` for each trial this process fails
            because its heartbeat stopped (``optuna.storages.fail_stale_trials``).

    Raises:
        EvomergeError: the URL is malformed or the database cannot be opened.
    """

    def refused(why: str) -> EvomergeError:  # every message shows the URL, never its password
        return EvomergeError(hide_password(f"{field}: cannot open storage {url}: {why}", url))

    # Like sqlite: journal:///rel/path, journal:////abs/path.
    journal = Path(url[len(JOURNAL) :]) if url.startswith(JOURNAL) else None
    file = journal or (Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None)
    if file is not None and not file.parent.is_dir():
        raise refused(f"folder {file.parent} does not exist")
    beats: dict[str, Any] = {}
    if liveness is not None and journal is None:
        beats = {
            "heartbeat_interval": liveness.interval,
            "grace_period": liveness.grace,
            "heartbeat_stale_trial_callback": on_stale,
        }
    try:
        storage = _rdb(url, beats) if journal is None else _journal(journal)
    except ImportError:
        driver = _DRIVERS.get(
            url.split(":", 1)[0].split("+", 1)[0], "the SQLAlchemy driver for this database"
        )
        raise refused(f"its database driver is not installed (pip install {driver})") from None
    except Exception as e:  # sqlalchemy raises many types here
        raise refused(f"{one_line(type(e).__name__)}: {one_line(e)[:200]}") from None
    if url.startswith("sqlite"):
        _fast_sqlite(storage.engine, immediate=liveness is not None)
    return storage


def _rdb(url: str, beats: dict[str, Any]) -> Any:
    import optuna

    engine = (
        {"pool_pre_ping": True}
        if not url.startswith("sqlite")
        else {"connect_args": {"timeout": 60}}
    )
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    _sqlalchemy_url(url), engine_kwargs=engine, **beats
                )
        except Exception as e:
            # Workers that start together on a new database all create its tables; the losers
            # of that race see "already exists" (or a duplicate key) once, then find the tables.
            text = str(e).lower()
            if attempt == 4 or not (
                "already exists" in text or "duplicate key" in text or "unique constraint" in text
            ):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _journal(path: Path) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _fast_sqlite(engine: Any, *, immediate: bool) -> None:
    """WAL journal with synchronous=NORMAL: a commit (a dozen per trial) does not wait for an
    fsync, and a killed process still loses nothing committed. Every
    transaction of a search (``immediate``; readers keep pysqlite's own) begins IMMEDIATE (see the
    module docstring): pysqlite's BEGIN comes late (before the first write, after the reads), so it
    is turned off and SQLAlchemy's begin emits ours."""
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        if immediate:
            dbapi_conn.isolation_level = None  # no implicit BEGIN from pysqlite
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    if immediate:
        event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections opened before the listener get the pragmas too


def load_study(paths: StudyPaths) -> Any:
    """The existing study at ``paths`` (for results/export/report).

    Raises:
        EvomergeError: there is no such study yet.
    """
    import optuna

    if paths.default_storage and not (paths.folder / "study.db").is_file():
        raise EvomergeError(
            f"no study {paths.name!r} yet ({paths.folder / 'study.db'} does not exist); run `evomerge search` on the space first"
        )
    storage = open_storage(paths.storage)
    try:
        return optuna.load_study(study_name=paths.name, storage=storage)
    except KeyError:
        names = [
            s.study_name
            for s in optuna.get_all_study_summaries(storage)
            if not is_claim(s.study_name)
        ]
        raise EvomergeError(
            f"no study {paths.name!r} in {hide_password(paths.storage)}"
            + (f" (it has: {', '.join(names)})" if names else "")
        ) from None


def locate(
    space_file: str | Path,
    *,
    study: str | None = None,
    storage: str | None = None,
    results_dir: str | Path = "results",
) -> StudyPaths:
    """The study of a space file, as the readers (``results``, ``export``, ``report``) find it.

    Raises:
        ConfigError: the space file is unreadable or invalid.
    """
    space = load_space(space_file)
    return study_paths(
        space_file,
        study=study,
        space_study=space.study_name,
        storage=storage,
        space_storage=space.storage,
        results_dir=results_dir,
    )

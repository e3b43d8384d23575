"""Where a study lives: its name, its folder under ``results/`` and its Optuna storage.

The default storage is an SQLite file in the study's folder, with a WAL journal; ``--storage URL``
(or the space's ``study.storage``) takes any Optuna RDB URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, one_line
from evomerge.space import load_space

__all__ = ["StudyPaths", "study_paths", "open_storage", "load_study", "locate"]

# What to install for a storage URL's database (SQLAlchemy 2 maps postgresql:// to psycopg 3).
_DRIVERS = {"postgresql": "'psycopg[binary]'", "mysql": "pymysql (and write the URL as mysql+pymysql://)"}


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
    except ImportError:
        driver = _DRIVERS.get(url.split(":", 1)[0].split("+", 1)[0], "the SQLAlchemy driver for this database")
        raise EvomergeError(f"{field}: cannot open storage {url}: its database driver is not installed (pip install {driver})") from None
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


def locate(space_file: str | Path, *, study: str | None = None, storage: str | None = None, results_dir: str | Path = "results") -> StudyPaths:
    """The study of a space file, as the readers (``results``, ``export``, ``report``) find it.

    Raises:
        ConfigError: the space file is unreadable or invalid.
    """
    space = load_space(space_file)
    return study_paths(space_file, study=study, space_study=space.study_name, storage=storage,
                       space_storage=space.storage, results_dir=results_dir)

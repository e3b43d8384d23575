"""The study commands (search, results, export, report) answer bad input with one line and exit 2."""

from __future__ import annotations

import pytest
from _spaces import write_space

from evomerge.cli import main


def _one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("verb", [["search"], ["results"], ["report"], ["export", "-o", "x.yml"]])
@pytest.mark.parametrize(
    "text, words",
    [("- a\n- b\n", "got list"), ("", "got NoneType"), ("just a string\n", "got str")],
)
def test_a_space_that_is_valid_yaml_but_not_a_mapping(tmp_path, capsys, verb, text, words):
    space = tmp_path / "space.yml"
    space.write_text(text)
    err = _one_line_error(
        capsys, verb[0], str(space), *verb[1:], "--results-dir", str(tmp_path / "r")
    )
    assert str(space) in err and "must be a mapping" in err and words in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.yml").exists()


@pytest.mark.parametrize(
    "url, words",
    [
        ("nonsense", "Could not parse SQLAlchemy URL"),
        ("postgresql://u@127.0.0.1:1/x", "pip install 'psycopg[binary]'"),
        ("sqlite:///{tmp}/not_a_db.db", "file is not a database"),
        ("sqlite:///{tmp}/a_folder", "unable to open database file"),
        ("sqlite:///{tmp}/missing/x.db", "does not exist"),
    ],
)
@pytest.mark.parametrize(
    "verb", ["results", "report"]
)  # search: test_search.py (Search with a fake evaluator)
def test_a_bad_storage_is_one_line_and_writes_nothing(
    tmp_path, tiny_family, capsys, url, words, verb
):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts)
    (tmp_path / "not_a_db.db").write_text("this is not SQLite\n")
    (tmp_path / "a_folder").mkdir()
    if "psycopg" in words:
        try:
            import psycopg  # noqa: F401

            words = "OperationalError"  # the driver is there: the server on port 1 is not
        except ImportError:
            pass
    url = url.format(tmp=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    err = _one_line_error(
        capsys, verb, str(space), "--storage", url, "--results-dir", str(tmp_path / "r")
    )
    assert "--storage" in err and words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_export_of_a_missing_trial_and_onto_a_folder(tmp_path, tiny_family, capsys):
    from _fake_eval import TaskVectorEvaluator

    from evomerge.search.loop import run_search

    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=2, finalists=1)
    results = tmp_path / "r"
    run_search(
        space,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=results,
        quiet=True,
        log=lambda m: None,
    )
    err = _one_line_error(
        capsys,
        "export",
        str(space),
        "--results-dir",
        str(results),
        "--trial",
        "99",
        "-o",
        str(tmp_path / "b.yml"),
    )
    assert "has no trial 99" in err
    (tmp_path / "folder").mkdir()
    err = _one_line_error(
        capsys,
        "export",
        str(space),
        "--results-dir",
        str(results),
        "-o",
        str(tmp_path / "folder"),
        "--force",
    )
    assert "is a directory" in err
    assert not (tmp_path / "b.yml").exists()


@pytest.mark.parametrize("where", ["/proc/evomerge-zoo", "{tmp}/a_file/demo"])
def test_a_zoo_folder_that_cannot_be_written(tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("not a folder\n")
    err = _one_line_error(capsys, "zoo", "--out", where.format(tmp=tmp_path))
    assert "cannot write there" in err and "--out" in err
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


def test_a_storage_that_fails_mid_run_is_one_line(monkeypatch, capsys):
    """A database locked by another program past the 60 s timeout (measured by hand: the demo with
    an exclusive lock held on study.db) surfaces as optuna's StorageInternalError."""
    import sqlite3

    from optuna.exceptions import StorageInternalError

    import evomerge.cli as cli

    def locked(args):
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as e:
            raise StorageInternalError("An exception is raised during the commit.") from e

    monkeypatch.setattr(cli, "_run", locked)
    err = _one_line_error(capsys, "results", "space.yml")
    assert (
        "the study's storage failed: OperationalError: database is locked" in err
        and "resumes" in err
    )
    monkeypatch.setattr(cli, "_run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is a bug, with its traceback
        cli.main(["results", "space.yml"])

"""Faults of a study: a kill or an interrupt at every point of a trial, a damaged or emptied
storage, inputs changed between runs, a results folder that cannot be written. Each ends in one
clear line or a resume, with nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _fake_eval import TaskVectorEvaluator
from _spaces import write_space
from _stopper import POINTS, install

from evomerge.errors import EvomergeError
from evomerge.search.distributed.liveness import Liveness
from evomerge.search.loop import run_search
from evomerge.search.table import load_trials

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]  # the helpers (_fake_eval, _stopper, ...)
FAST = Liveness(interval=1, grace=2, poll=0.2)  # a trial nobody claimed is dead after 2 s

STOP_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import conftest  # offline env
    from _fake_eval import TaskVectorEvaluator
    from _stopper import install
    from evomerge.search.distributed.liveness import Liveness
    from evomerge.search.loop import run_search
    if sys.argv[1] != "go":
        install(sys.argv[1], lambda: os.kill(os.getpid(), signal.SIGKILL))
    run_search({space!r}, evaluator=TaskVectorEvaluator({base!r}, {fts!r}), results_dir={results!r},
               quiet=True, liveness=Liveness(interval=1, grace=2, poll=0.2))
    print("DONE")
""")


def _check_resumed(csv: Path, done) -> None:
    df = load_trials(csv)
    searched = df[df["baseline"] == ""]
    assert not (searched["state"] == "RUNNING").any()
    assert (searched["state"] == "COMPLETE").sum() == 4
    kept = done.merge(searched[["number", "digest"]], on="number", suffixes=("", "_after"))
    assert len(kept) == len(done) and (kept["digest"] == kept["digest_after"]).all()
    assert df["chosen"].sum() == 1 and df.loc[df["chosen"], "test"].notna().all()
    assert (df["baseline"].str.startswith("source:")).sum() == 4  # baselines not run twice


def _completed(csv: Path):
    before = load_trials(csv)
    done = before[(before["baseline"] == "") & (before["state"] == "COMPLETE")]
    assert set(done["number"]) >= {0, 1}  # the stop came in trial 2
    return done[["number", "digest"]]


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_at_any_point_of_a_trial_then_the_same_command_finishes(
    tmp_path, tiny_family, point
):
    """``kill -9`` in trial 2 at each point; running the same command again finishes the study
    (a trial nobody claimed is failed after the grace period, not waited for)."""
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=4, finalists=1)
    script = tmp_path / "stop.py"
    results = tmp_path / "results"
    script.write_text(
        STOP_SCRIPT.format(
            tests=str(TESTS),
            space=str(space),
            base=str(base),
            fts=[str(f) for f in fts],
            results=str(results),
        )
    )
    run = lambda arg: subprocess.run(  # noqa: E731
        [sys.executable, str(script), arg], capture_output=True, text=True, timeout=300
    )
    stopped = run(point)
    assert stopped.returncode == -9, stopped.stderr[-2000:]
    csv = results / "space" / "trials.csv"
    done = _completed(csv)
    again = run("go")
    assert again.returncode == 0 and "DONE" in again.stdout, again.stderr[-2000:]
    _check_resumed(csv, done)


@pytest.mark.parametrize("point", list(POINTS))
def test_an_interrupt_at_any_point_of_a_trial_leaves_a_study_that_resumes(
    tmp_path, tiny_family, point, monkeypatch
):
    """Ctrl-C in trial 2 at each point: the search stops with no trial left RUNNING, the table
    written, and the next run finishes it."""
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=4, finalists=1)

    def interrupt() -> None:  # Ctrl-C: the search's own SIGINT handler takes it
        os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        install(point, interrupt, m.setattr)
        with pytest.raises(KeyboardInterrupt):
            _search(space, tmp_path, tiny_family)
    csv = tmp_path / "results" / "space" / "trials.csv"
    done = _completed(csv)
    assert not (load_trials(csv)["state"] == "RUNNING").any()
    _search(space, tmp_path, tiny_family)
    _check_resumed(csv, done)


def _search(space: Path, tmp_path: Path, tiny_family, **kw) -> object:
    base, fts = tiny_family
    return run_search(
        space,
        evaluator=TaskVectorEvaluator(base, fts, **kw),
        results_dir=tmp_path / "results",
        quiet=True,
        log=lambda m: None,
        liveness=FAST,
    )


def _search_elsewhere(space: Path, tmp_path: Path, tiny_family) -> subprocess.CompletedProcess:
    """The same search in a process of its own (as a user runs it again), its error as the CLI
    prints it."""
    base, fts = tiny_family
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import conftest  # offline env
        from _fake_eval import TaskVectorEvaluator
        from evomerge.errors import EvomergeError, one_line
        from evomerge.search.loop import run_search
        try:
            run_search({str(space)!r}, evaluator=TaskVectorEvaluator({str(base)!r}, {[str(f) for f in fts]!r}),
                       results_dir={str(tmp_path / "results")!r}, quiet=True, log=lambda m: None)
        except EvomergeError as e:
            print(f"evomerge: error: {{one_line(e)}}", file=sys.stderr)
            sys.exit(2)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["emptied", "replaced", "garbage"])
def test_a_damaged_storage_never_costs_the_table(tmp_path, tiny_family, damage):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=2, finalists=1)
    out = _search(space, tmp_path, tiny_family)
    db, csv = out.paths.folder / "study.db", out.paths.csv
    table = csv.read_bytes()
    for side in db.parent.glob("study.db-*"):
        side.unlink()
    if damage == "emptied":
        db.write_bytes(b"")
    elif damage == "replaced":  # another study's database put in its place
        other = write_space(tmp_path / "other.yml", base, fts, trials=1, finalists=0)
        _search(other, tmp_path, tiny_family)
        db.unlink()
        (tmp_path / "results" / "other" / "study.db").rename(db)
    else:
        db.write_bytes(os.urandom(4096))
    r = _search_elsewhere(space, tmp_path, tiny_family)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    if damage != "garbage":
        assert (
            "trials.csv: holds 2 trial(s) that study 'space' in its storage does not have"
            in r.stderr
        )
    else:
        assert "cannot open storage" in r.stderr and "not a database" in r.stderr
    assert csv.read_bytes() == table  # the only copy of the results is kept as it was


def test_changed_evaluation_or_sources_are_refused_not_mixed(tmp_path, tiny_family):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=2, finalists=1)
    _search(space, tmp_path, tiny_family)
    table = (tmp_path / "results" / "space" / "trials.csv").read_bytes()
    with pytest.raises(EvomergeError, match="its evaluation .* changed since it started"):
        _search(space, tmp_path, tiny_family, holdout_scale=0.5)  # other items, other scores
    weights = fts[1] / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    try:
        with pytest.raises(EvomergeError, match="its source models .* changed since it started"):
            _search(space, tmp_path, tiny_family)
    finally:
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns - 10**9))
    assert (tmp_path / "results" / "space" / "trials.csv").read_bytes() == table
    _search(space, tmp_path, tiny_family)  # restored: the study resumes


def test_a_table_that_cannot_be_written_mid_search_is_one_line_and_resumes(
    tmp_path, tiny_family, monkeypatch
):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=3, finalists=1)
    import evomerge.search.table as table

    real, calls = table.atomic_file, {"n": 0}

    def failing(path, write, mode="w"):
        calls["n"] += 1
        if calls["n"] == 3:  # after the baselines' table and the first trial's
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, write, mode=mode)

    monkeypatch.setattr(table, "atomic_file", failing)
    with pytest.raises(EvomergeError) as e:
        _search(space, tmp_path, tiny_family)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(
        "cannot write the results table "
    ) and "Permission denied" in str(e.value)
    monkeypatch.setattr(table, "atomic_file", real)
    _search(space, tmp_path, tiny_family)
    df = load_trials(tmp_path / "results" / "space")
    assert ((df["baseline"] == "") & (df["state"] == "COMPLETE")).sum() == 3

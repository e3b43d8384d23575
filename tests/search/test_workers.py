"""Several workers, one study: claims on every storage backend, worker processes on a real
PostgreSQL server (the budget across workers, once-per-study work run once, a SIGKILLed worker's
trial failed and retried through its stopped heartbeat, the results read from another directory),
and ``evomerge search --workers 2`` on CPU with the default SQLite storage.

PostgreSQL: ``$EVOMERGE_TEST_POSTGRES`` (``.ci/postgres`` sets it), else a throwaway server started
here with ``.ci/postgres`` when PostgreSQL's binaries are installed, else the PostgreSQL tests skip
with the reason; under CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from _spaces import write_space, zoo_space

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.search.distributed.claims import Claims, is_claim
from evomerge.search.distributed.coordinator import Coordinator, SharedCoordinator
from evomerge.search.distributed.liveness import Liveness
from evomerge.search.records import StudyRecords
from evomerge.search.storage import open_storage
from evomerge.zoo import task_names

TESTS = Path(__file__).resolve().parents[1]  # the helpers (_fake_eval, _stopper, ...)
ROOT = TESTS.parent
UNDER_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# One worker: the fake evaluator (each evaluation appended to a log: pid and split), one study.
RUNNER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import conftest  # offline env
    from _fake_eval import TaskVectorEvaluator
    from evomerge.search.loop import run_search
    from evomerge.search.distributed.liveness import Liveness

    cfg = json.loads(sys.argv[1])

    class Logged(TaskVectorEvaluator):
        def evaluate(self, model, split="search"):
            r = super().evaluate(model, split)
            with open(cfg["log"], "a") as f:
                f.write(f"{{os.getpid()}} {{split}}\\n")
            return r

    ev = Logged(cfg["base"], cfg["fts"], sleep=cfg["sleep"], marker=cfg.get("marker"))
    if cfg.get("barrier"):  # start together: every worker imported and ready
        import pathlib, time
        barrier = pathlib.Path(cfg["barrier"])
        (barrier / f"ready-{{os.getpid()}}").touch()
        while not (barrier / "go").exists():
            time.sleep(0.05)
    out = run_search(cfg["space"], evaluator=ev, results_dir=cfg["results"], storage=cfg["storage"], study=cfg["study"],
                     quiet=True, liveness=Liveness(*cfg["liveness"]))
    print("DONE", out.n_complete, flush=True)
""")


# ----------------------------------------------------------------------------------- PostgreSQL
def _skip_or_fail(reason: str) -> None:
    if UNDER_CI:
        pytest.fail(f"PostgreSQL tests cannot run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL URL: ``$EVOMERGE_TEST_POSTGRES``, or a server of our own for this module."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _skip_or_fail("psycopg is not installed (pip install -e '.[test]' installs it)")
    url = os.environ.get("EVOMERGE_TEST_POSTGRES")
    if url:
        yield url
        return
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not shutil.which("initdb"):
        _skip_or_fail(
            "EVOMERGE_TEST_POSTGRES is unset and PostgreSQL is not installed here (run the tests through .ci/postgres)"
        )
    if os.geteuid() == 0 and not shutil.which("runuser"):
        _skip_or_fail(
            "EVOMERGE_TEST_POSTGRES is unset and there is no runuser to start PostgreSQL as an unprivileged user"
        )
    # .ci/postgres keeps its server until our command ends: a python that prints the URL and waits for stdin to close.
    hold = (
        "import os, sys; print(os.environ['EVOMERGE_TEST_POSTGRES'], flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [str(ROOT / ".ci" / "postgres"), sys.executable, "-c", hold],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = proc.stdout.readline().strip() if proc.stdout else ""
    if not url.startswith("postgresql://"):
        proc.kill()
        _skip_or_fail(
            f"EVOMERGE_TEST_POSTGRES is unset and .ci/postgres could not start a server: {proc.stderr.read()[-500:] if proc.stderr else ''}"
        )
    try:
        yield url
    finally:
        proc.stdin.close()
        proc.wait(60)


def _cfg(
    tmp_path: Path,
    tiny_family,
    storage: str,
    study: str,
    *,
    sleep: float,
    liveness=(1, 3, 0.3),
    marker: str | None = None,
) -> dict:
    base, fts = tiny_family
    return {
        "tests": str(TESTS),
        "base": str(base),
        "fts": [str(f) for f in fts],
        "space": str(tmp_path / "space.yml"),
        "results": str(tmp_path / "results"),
        "storage": storage,
        "study": study,
        "log": str(tmp_path / "evaluations.log"),
        "sleep": sleep,
        "liveness": list(liveness),
        "marker": marker,
    }


def _start(tmp_path: Path, cfg: dict, host: str | None = None) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    if not script.exists():
        script.write_text(RUNNER.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if host:
        env["EVOMERGE_HOST"] = host  # plays another host: its pid means nothing here
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _study(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(url))


def _claims_left(url: str, name: str) -> list[str]:
    import optuna

    return [
        s.study_name
        for s in optuna.get_all_study_summaries(open_storage(url))
        if s.study_name.startswith(name + "::")
    ]


def _evaluations(tmp_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (tmp_path / "evaluations.log").read_text().splitlines():
        split = line.split()[1]
        counts[split] = counts.get(split, 0) + 1
    return counts


@pytest.fixture(scope="module")
def three_workers(postgres, tiny_family, tmp_path_factory):
    """Three worker processes on one PostgreSQL study with a budget of 9 trials."""
    tmp = tmp_path_factory.mktemp("three")
    base, fts = tiny_family
    write_space(tmp / "space.yml", base, fts, trials=9, finalists=3)
    study = f"three-{uuid.uuid4().hex[:8]}"
    # a grace period no busy 2-core box reaches by accident: nobody dies in this test
    cfg = {
        **_cfg(tmp, tiny_family, postgres, study, sleep=0.4, liveness=(2, 30, 0.3)),
        "barrier": str(tmp),
    }
    start = time.perf_counter()
    procs = [_start(tmp, cfg) for _ in range(3)]
    end = time.time() + 180
    while (
        len(list(tmp.glob("ready-*"))) < 3
        and time.time() < end
        and all(p.poll() is None for p in procs)
    ):
        time.sleep(0.05)
    (tmp / "go").touch()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    return {
        "url": postgres,
        "study": study,
        "tmp": tmp,
        "codes": [p.returncode for p in procs],
        "outs": outs,
        "seconds": time.perf_counter() - start,
    }


@pytest.mark.slow
def test_three_workers_complete_the_budget_and_run_the_once_per_study_work_once(three_workers):
    w = three_workers
    assert w["codes"] == [0, 0, 0], "\n".join(o[-1500:] for o in w["outs"])
    study = _study(w["url"], w["study"])
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 9 and "RUNNING" not in states, "\n".join(
        o[-1500:] for o in w["outs"]
    )
    # every worker took trials (the study is shared, not run three times)
    owners = {t.user_attrs["proc"]["pid"] for t in study.trials if t.state.name == "COMPLETE"}
    assert len(owners) >= 2, "\n".join(o[-800:] for o in w["outs"])
    attrs = study.user_attrs
    baselines = sorted(k for k in attrs if k.startswith("baseline:"))
    assert len(baselines) == 5 and all(attrs[k]["state"] == "COMPLETE" for k in baselines)
    validated = [k for k in attrs if k.startswith("validation:")]
    tested = [k for k in attrs if k.startswith("test:")]
    top3 = sorted(
        (t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value, reverse=True
    )[:3]
    assert {f"validation:{t.number}" for t in top3} <= set(validated)
    # the chosen trial (best validation score) was tested; every tested trial was validated
    chosen = max(validated, key=lambda k: (attrs[k]["aggregate"], -int(k.split(":")[1])))
    assert f"test:{chosen.split(':')[1]}" in tested
    assert {k.split(":")[1] for k in tested} <= {k.split(":")[1] for k in validated}
    # each evaluation ran once across the workers: 5 baselines (search, validation and test), one
    # search evaluation per trial that ran, one evaluation per re-score
    ran = sum(
        1
        for t in study.trials
        if t.user_attrs.get("result", {}).get("search")
        or "interrupted" in t.user_attrs.get("result", {}).get("error", "")
    )
    logs = "\n".join(o[-1500:] for o in w["outs"])
    assert _evaluations(w["tmp"]) == {
        "search": 5 + ran,
        "validation": 5 + len(validated),
        "test": 5 + len(tested),
    }, logs
    assert ran == 9, logs
    assert attrs["setup"] and attrs["search_tasks"] == ["task_0", "task_1", "task_2"]
    # each trial was proposed with a seed of its own (by its number): no two drew the same point
    points = [tuple(sorted(t.params.items())) for t in study.trials if t.params]
    assert len(set(points)) == len(points)
    assert _claims_left(w["url"], w["study"]) == []


@pytest.mark.slow
def test_results_read_from_the_storage_in_another_directory_and_process(three_workers, tmp_path):
    w = three_workers
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(w["tmp"] / "space.yml", other / "space.yml")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.cli",
            "results",
            "space.yml",
            "--storage",
            w["url"],
            "--study",
            w["study"],
            "--all",
        ],
        cwd=other,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-1500:]
    assert f"study {w['study']} ({w['url']}): 14 complete rows" in r.stdout  # 9 trials, 5 baselines
    assert "[uniform]" in r.stdout and "::claim::" not in r.stdout
    assert not (other / "results").exists()  # nothing written where the reader runs
    # the table of the storage, as trials.csv holds it (written by the workers)
    from evomerge.search.table import load_trials, trials_frame

    df = trials_frame(_study(w["url"], w["study"]))
    csv = load_trials(w["tmp"] / "results" / w["study"])
    assert sorted(df["number"].dropna()) == sorted(csv["number"].dropna())
    assert (csv[csv["baseline"] == ""]["state"] == "COMPLETE").sum() == 9


@pytest.mark.slow
def test_a_sigkilled_worker_trial_is_failed_by_heartbeat_and_retried_once(
    postgres, tiny_family, tmp_path
):
    base, fts = tiny_family
    write_space(tmp_path / "space.yml", base, fts, trials=8, finalists=2)
    study = f"kill-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "evaluating-A"
    beats = (1, 5, 0.3)
    victim = _start(
        tmp_path,
        _cfg(tmp_path, tiny_family, postgres, study, sleep=0.6, liveness=beats, marker=str(marker)),
        host="host-A",
    )
    survivor = _start(
        tmp_path,
        _cfg(tmp_path, tiny_family, postgres, study, sleep=0.6, liveness=beats),
        host="host-B",
    )
    try:

        def in_a_trial() -> bool:
            try:
                s = _study(postgres, study)
            except (KeyError, EvomergeError):
                return False
            baselines = [k for k in s.user_attrs if k.startswith("baseline:")]
            done = [t for t in s.trials if t.state.name == "COMPLETE"]
            return len(baselines) == 5 and len(done) >= 2 and marker.exists()

        end = time.time() + 180
        while not in_a_trial():
            assert time.time() < end and victim.poll() is None, "worker A never got to a trial"
            time.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
        out = survivor.communicate(timeout=240)[0]
    finally:
        for p in (victim, survivor):
            if p.poll() is None:
                p.kill()
    assert survivor.returncode == 0, out[-2000:]
    s = _study(postgres, study)
    trials = s.trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 8 and not any(
        t.state.name == "RUNNING" for t in trials
    )
    dead = [t for t in trials if f"died:{t.number}" in s.user_attrs]
    assert len(dead) == 1 and dead[0].state.name == "FAIL"
    assert (
        "no heartbeat" in s.user_attrs[f"died:{dead[0].number}"]
        and "host-A" in s.user_attrs[f"died:{dead[0].number}"]
    )
    retry = [t for t in trials if StudyRecords.retry_of(t) == dead[0].number]
    assert (
        len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == dead[0].params
    )
    assert retry[0].user_attrs["proc"]["host"] == "host-B"
    # the dead worker's slot claim was swept by the survivor as it stopped
    assert _claims_left(postgres, study) == []


# ----------------------------------------------------------------------------------- one host
@pytest.mark.slow
def test_cli_workers_2_on_cpu_share_the_default_sqlite_study(micro_zoo, tmp_path, capsys):
    from evomerge.search.table import load_trials

    search, holdout = task_names()
    space = zoo_space(tmp_path / "space.yml", tasks=search, holdout=holdout, trials=4)
    results = tmp_path / "results"
    env = {**os.environ, "EVOMERGE_ZOO_DIR": str(micro_zoo.parent)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.cli",
            "search",
            str(space),
            "--workers",
            "2",
            "--device",
            "cpu",
            "--results-dir",
            str(results),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "evomerge: 2 workers on CPU" in r.stdout and "[w0] " in r.stdout and "[w1] " in r.stdout
    assert (
        "on the test items, the chosen trial" in r.stdout
    )  # one leaderboard and summary, from the storage
    df = load_trials(results / "zoo")
    searched = df[df["baseline"] == ""]
    assert (
        searched["state"].isin(["COMPLETE", "PRUNED"]).sum() == 4
    )  # pruned trials (on by default) count against the budget
    assert sorted(df.loc[df["baseline"] != "", "baseline"]) == sorted(
        ["uniform", *(f"source:zoo:micro/{m}" for m in ("base", "rot", "shift", "sort"))]
    )
    assert (results / "zoo" / "study.db").is_file()


def test_a_trial_asked_in_the_same_instant_as_the_last_one_is_surplus(tmp_path):
    """Budget 2, one trial finished: of two trials asked in the same instant (both RUNNING), the
    earlier is run and the later is surplus; once the earlier finishes, any new one is surplus.
    A study only this process sees has no other workers: nothing is surplus there."""
    import optuna

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    records = StudyRecords(study)
    study.tell(study.ask(), 0.5)
    first, second = study.ask(), study.ask()
    shared = SharedCoordinator(storage, "s", Liveness(), log=lambda m: None)
    assert not shared.surplus(records, first.number, budget=2)
    assert shared.surplus(records, second.number, budget=2)
    assert not shared.surplus(records, second.number, budget=3)
    study.tell(first, 0.6)
    assert shared.surplus(records, study.ask().number, budget=2)
    assert not Coordinator().surplus(records, second.number, budget=2)


def test_workers_bad_counts_are_one_line_exit_2(tmp_path, tiny_family, capsys):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts)
    for argv, words in (
        (["--workers", "0"], "--workers: must be a positive integer, got 0"),
        (["--devices", "0,x"], "--devices: must be distinct CUDA device indices"),
        (["--workers", "3", "--devices", "0,1"], "one worker per device"),
    ):
        assert main(["search", str(space), "--results-dir", str(tmp_path / "r"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "r").exists()


def test_a_missing_postgres_driver_names_the_extra(monkeypatch):
    for mod in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, mod, None)  # import psycopg raises ImportError
    with pytest.raises(
        EvomergeError,
        match=r"its database driver is not installed \(pip install 'psycopg\[binary\]'\)",
    ):
        open_storage("postgresql://u@127.0.0.1:1/x")


# ----------------------------------------------------------------------------------- claims
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_claims_one_owner_takeover_of_a_dead_one_and_nothing_left(tmp_path, kind, request):
    from optuna.study import StudyDirection

    from evomerge.search.records import HOST

    url = {
        "sqlite": f"sqlite:///{tmp_path / 'claims.db'}",
        "journal": f"journal:///{tmp_path / 'claims.log'}",
    }.get(kind)
    if kind == "postgresql":
        url = request.getfixturevalue("postgres")
    fast = Liveness(interval=1, grace=2, poll=0.1)
    storage = open_storage(url, liveness=fast)  # heartbeats on RDB storages; the journal has none
    name = f"c-{uuid.uuid4().hex[:8]}"
    a, b = Claims(storage, name, fast), Claims(storage, name, fast)
    held = a.acquire("setup")
    assert held is not None and b.acquire("setup") is None  # one owner
    # the owner finishes: the other finds the work done and does not run it
    done = ["setup"]
    a.release(held)
    assert (
        b.run_once("setup", done=lambda: "setup" in done, work=lambda: pytest.fail("ran twice"))
        is False
    )
    # an owner that died (a pid of this host that is gone) is taken over at once, by the next generation
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sid = storage.create_new_study([StudyDirection.MINIMIZE], a.name("baseline:x", 0))
    storage.set_study_user_attr(sid, "owner", {"host": HOST, "pid": dead.pid})
    ran = []
    assert b.run_once(
        "baseline:x", done=lambda: bool(ran), work=lambda: ran.append(1)
    ) is True and ran == [1]
    # an owner on another host that stops beating is dead after the grace period (the database's
    # clock where there are heartbeats, the watcher's clock on the journal)
    frozen = a.acquire("holdout:3")
    frozen.pulse.stop()
    storage.set_study_user_attr(frozen.study_id, "owner", {"host": "elsewhere", "pid": 1})
    t0 = time.monotonic()
    assert b.run_once("holdout:3", done=lambda: False, work=lambda: None) is True
    assert time.monotonic() - t0 >= fast.grace - 1.5
    # a worker that fails gives its claim up for the next one
    with pytest.raises(RuntimeError):
        a.run_once(
            "baseline:y",
            done=lambda: False,
            work=lambda: (_ for _ in ()).throw(RuntimeError("boom")),
        )
    held_y = b.acquire("baseline:y")
    assert held_y is not None
    slot_a, slot_b = a.slot(), b.slot()
    assert {slot_a.task, slot_b.task} == {"worker:0", "worker:1"}
    for c in (slot_a, slot_b):
        a.release(c)
    # a stopping worker sweeps the claims of dead owners (here: a pid gone from this host)
    orphan = a.acquire("holdout:9")
    orphan.pulse.stop()
    storage.set_study_user_attr(orphan.study_id, "owner", {"host": HOST, "pid": dead.pid})
    assert b.sweep() == [a.name("holdout:9", 0)]
    left = [s for s in _all_names(storage) if s.startswith(name) and is_claim(s)]
    assert left == [a.name("baseline:y", 0)]  # b still holds it
    b.release(held_y)
    assert not [s for s in _all_names(storage) if s.startswith(name) and is_claim(s)]


def _all_names(storage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]

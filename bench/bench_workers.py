"""Several workers on one study (issue 13): throughput against the number of workers, and what the
storage costs per trial, for SQLite (the default), Optuna's journal file and PostgreSQL.

A trial is a merge of tiny Llama models (milliseconds) scored by the fake evaluator of
``tests/_fake_eval.py``, which sleeps ``--sleep`` seconds per evaluation to stand in for a GPU
evaluation: a sleeping worker leaves the CPU free, as a worker waiting for its GPU does, so 4
workers on this 2-core machine behave like 4 GPU workers (their CPU work, a few ms per trial, still
shares the 2 cores).

1. Throughput: ``--trials`` trials with 1, 2 and 4 worker processes started together on one study
   (with the baselines and finalists the study needs): trials per minute while every worker
   searches (from the moment the last worker starts its first trial, after its share of the
   baselines, to the last trial's start; the storage's timestamps), the speed-up over one worker,
   and the wall time from start to the last worker's exit.
2. Bookkeeping per trial: a worker's time from its first trial's start to its last trial's end,
   less its trials' merges and evaluations and the holdout re-scores it ran in between, per trial;
   what is left is asking (the sampler included), telling, the trial's records, heartbeats, the
   budget count, recovery checks and the ``trials.csv`` rewrite (which reads the whole study). Also
   measured alone with no sleep (``--overhead-trials``), where no worker waits for another.

Usage:
    python bench/bench_workers.py [--storages sqlite journal postgresql] [--workers 1 2 4]
        [--trials 16] [--sleep 2.0] [--overhead-trials 40] [--postgres URL] [--json out.json]

PostgreSQL comes from ``--postgres`` or ``$EVOMERGE_TEST_POSTGRES`` (``.ci/postgres python
bench/bench_workers.py`` starts a throwaway server); without one it is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

RUNNER = textwrap.dedent("""
    import json, os, pathlib, sys, time
    sys.path.insert(0, {tests!r})
    import conftest  # offline env
    from _fake_eval import TaskVectorEvaluator
    from evomerge.search.loop import run_search

    cfg = json.loads(sys.argv[1])

    class Timed(TaskVectorEvaluator):  # each evaluation's split, start and end (this host's clock)
        def evaluate(self, model, split="search"):
            t0 = time.time()
            r = super().evaluate(model, split)
            with open(cfg["timeline"], "a") as f:
                f.write(f"{{os.getpid()}} {{split}} {{t0}} {{time.time()}}\\n")
            return r

    ev = Timed(cfg["base"], cfg["fts"], sleep=cfg["sleep"])
    barrier = pathlib.Path(cfg["barrier"])
    (barrier / f"ready-{{os.getpid()}}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.02)
    run_search(cfg["space"], evaluator=ev, results_dir=cfg["results"], storage=cfg["storage"], study=cfg["study"], quiet=True)
""")


def _models(root: Path) -> tuple[Path, list[Path]]:
    sys.path.insert(0, str(TESTS))
    from _tiny import make_tiny, perturbed

    base = make_tiny(root / "base", seed=0)
    return base, [perturbed(base, root / f"ft{i}", seed=i + 1, scale=0.05) for i in range(3)]


def _space(path: Path, base: Path, fts: list[Path], trials: int) -> Path:
    sys.path.insert(0, str(TESTS))
    from _spaces import write_space

    return write_space(path, base, fts, trials=trials, finalists=3)


def _url(kind: str, folder: Path, postgres: str | None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{folder / 'study.db'}"
    if kind == "journal":
        return f"journal:///{folder / 'study.log'}"  # an absolute path: journal:////...
    assert postgres
    return postgres


def run(
    kind: str,
    workers: int,
    *,
    trials: int,
    sleep: float,
    models: tuple[Path, list[Path]],
    tmp: Path,
    postgres: str | None,
) -> dict:
    """One study with ``workers`` worker processes; figures read back from the storage."""
    import optuna

    from evomerge.search.storage import open_storage

    base, fts = models
    folder = tmp / f"{kind}-{workers}-{trials}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    space = _space(folder / "space.yml", base, fts, trials)
    study = f"bench-{folder.name}"
    url = _url(kind, folder, postgres)
    runner = folder / "runner.py"
    runner.write_text(RUNNER.format(tests=str(TESTS)))
    cfg = {
        "base": str(base),
        "fts": [str(f) for f in fts],
        "space": str(space),
        "results": str(folder / "results"),
        "storage": url,
        "study": study,
        "sleep": sleep,
        "barrier": str(folder),
        "timeline": str(folder / "timeline.txt"),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(runner), json.dumps(cfg)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(workers)
    ]
    while len(list(folder.glob("ready-*"))) < workers and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    t0 = time.perf_counter()
    (folder / "go").touch()
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    wall = time.perf_counter() - t0
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(
            f"{kind} x{workers}: worker exit codes {codes}\n" + "\n".join(o[-1500:] for o in outs)
        )
    s = optuna.load_study(study_name=study, storage=open_storage(url))
    searched = sorted(
        (t for t in s.trials if t.datetime_start and t.datetime_complete),
        key=lambda t: t.datetime_start,
    )
    done = [t for t in searched if t.state.name == "COMPLETE"]
    evals = [line.split() for line in (folder / "timeline.txt").read_text().splitlines()]
    # Throughput while every worker searches: trials started between the moment the last worker
    # started its first trial (each scored baselines before) and the last trial's start.
    by_worker: dict[int, list] = {}
    for t in searched:
        by_worker.setdefault(t.user_attrs["proc"]["pid"], []).append(t)
    t_all = max(ts[0].datetime_start for ts in by_worker.values())
    t_last = searched[-1].datetime_start
    steady = [t for t in searched if t_all <= t.datetime_start < t_last]
    window = (t_last - t_all).total_seconds()
    # A worker's bookkeeping per trial: its time from its first trial's start to its last trial's
    # end, less its trials' merges and evaluations and the holdout re-scores it ran in between.
    spare, n = 0.0, 0
    for pid, ts in by_worker.items():
        a, b = ts[0].datetime_start.timestamp(), ts[-1].datetime_complete.timestamp()
        busy = sum(
            (t.user_attrs["result"].get("merge_s") or 0)
            + (t.user_attrs["result"].get("eval_s") or 0)
            for t in ts
        )
        busy += sum(
            float(e) - float(st)
            for p, split, st, e in evals
            if int(p) == pid and split == "holdout" and a <= float(st) <= b
        )
        spare += b - a - busy
        n += len(ts)
    span = (searched[-1].datetime_complete - searched[0].datetime_start).total_seconds()
    return {
        "storage": kind,
        "workers": workers,
        "trials": len(done),
        "failed": len(searched) - len(done),
        "sleep": sleep,
        "search_s": round(span, 2),
        "wall_s": round(wall, 2),
        "trials_per_min": round(len(steady) / window * 60, 1)
        if window > 0 and steady
        else round(len(done) / span * 60, 1),
        "overhead_ms": round(spare / n * 1000, 1),
        "errors": sum(o.count("Traceback") + o.count("database is locked") for o in outs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storages", nargs="+", default=["sqlite", "journal", "postgresql"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument(
        "--sleep",
        type=float,
        default=2.0,
        help="seconds per evaluation (the stand-in for a GPU evaluation)",
    )
    ap.add_argument(
        "--overhead-trials",
        type=int,
        default=40,
        help="trials of the overhead runs (no sleep); 0 skips them",
    )
    ap.add_argument("--postgres", default=os.environ.get("EVOMERGE_TEST_POSTGRES"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    kinds = [k for k in args.storages if k != "postgresql" or args.postgres]
    if len(kinds) < len(args.storages):
        print(
            "postgresql left out: no --postgres URL and no $EVOMERGE_TEST_POSTGRES (run under .ci/postgres)",
            flush=True,
        )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as d:
        tmp = Path(d)
        models = _models(tmp / "models")
        for kind in kinds:
            for w in args.workers:
                r = run(
                    kind,
                    w,
                    trials=args.trials,
                    sleep=args.sleep,
                    models=models,
                    tmp=tmp,
                    postgres=args.postgres,
                )
                one = next(
                    (
                        x
                        for x in rows
                        if x["storage"] == kind and x["workers"] == 1 and x["sleep"] == args.sleep
                    ),
                    r,
                )
                r["speedup"] = round(r["trials_per_min"] / one["trials_per_min"], 2)
                rows.append(r)
                print(json.dumps(r), flush=True)
        if args.overhead_trials:
            for kind in kinds:
                for w in (1,):
                    r = run(
                        kind,
                        w,
                        trials=args.overhead_trials,
                        sleep=0.0,
                        models=models,
                        tmp=tmp,
                        postgres=args.postgres,
                    )
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print()
    print(
        "| storage | workers | sleep/eval | trials | wall (start to exit) | trials/min (all workers searching) | speed-up | bookkeeping/trial | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['storage']} | {r['workers']} | {r['sleep']:g} s | {r['trials']} | {r['wall_s']:.1f} s | {r['trials_per_min']:.1f} | "
            f"{r.get('speedup', '-')} | {r['overhead_ms']:.0f} ms | {r['errors']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

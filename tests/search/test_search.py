"""The search loop on tiny models with a task-vector evaluator: table, baselines, holdout,
export round trip, determinism, failures, resume after SIGKILL, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _fake_eval import TaskVectorEvaluator
from _spaces import write_space

from evomerge.cli import main
from evomerge.engine import digest_model_dir
from evomerge.errors import ConfigError, EvomergeError
from evomerge.search.loop import run_search
from evomerge.search.setup import prepare
from evomerge.search.table import load_trials
from evomerge.space import SAMPLERS

TESTS = Path(__file__).resolve().parents[1]  # the helpers (_fake_eval, _stopper, ...)


@pytest.fixture
def space(tmp_path, tiny_family):
    base, fts = tiny_family
    return write_space(tmp_path / "space.yml", base, fts)


@pytest.mark.slow
def test_search_fills_the_table_and_beats_its_baselines(space, tmp_path, tiny_family):
    base, fts = tiny_family
    ev = TaskVectorEvaluator(base, fts)
    out = run_search(
        space, evaluator=ev, results_dir=tmp_path / "results", quiet=True, log=lambda m: None
    )
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    assert (searched["state"] == "COMPLETE").sum() == 8 == out.n_complete
    # every sampled parameter is a column; methods' own parameters only where chosen
    assert {"p_method", "p_weight.ft0", "p_density.ft0", "p_lambda"} <= set(df.columns)
    ta = searched[searched["p_method"] == "task_arithmetic"]
    assert ta["p_density.ft0"].isna().all()
    for col in (
        "score",
        "score_se",
        "s_task_0",
        "se_task_0",
        "merge_s",
        "eval_s",
        "digest",
        "merge_lineage",
        "overfit",
        "public_benchmark_search",
        "error",
    ):
        assert col in df.columns, col
    # baselines: every source alone and the uniform merge, with search and holdout scores
    names = set(df.loc[df["baseline"] != "", "baseline"])
    assert names == {f"source:{base}", *(f"source:{f}" for f in fts), "uniform"}
    assert df.loc[df["baseline"] == f"source:{base}", "score"].iloc[0] == pytest.approx(
        0.0, abs=1e-6
    )
    # the fine-tune alone carries all of its own task vector
    assert df.loc[df["baseline"] == f"source:{fts[0]}", "s_task_0"].iloc[0] == pytest.approx(
        1.0, abs=1e-6
    )
    # finalists (top 3 by search score) were re-scored on the validation items, and the chosen
    # trial is the best of them there; only it (and the baselines) has a test score
    top3 = searched.sort_values("score", ascending=False).head(3)
    assert top3["validation"].notna().all()
    chosen = out.chosen
    assert chosen is not None and chosen["validation"] == pytest.approx(
        searched["validation"].max()
    )
    assert df["chosen"].sum() == 1 and df.loc[df["chosen"], "number"].iloc[0] == chosen["number"]
    assert df.loc[df["chosen"], "chosen_by"].iloc[0] == "validation"
    assert list(searched.loc[searched["test"].notna(), "number"]) == [chosen["number"]]
    baselines = df[df["baseline"] != ""]
    assert baselines["validation"].notna().all() and baselines["test"].notna().all()
    # the task-vector objective rewards keeping every delta: the search beats the obvious, on
    # the test items, which chose nothing
    uniform = df.loc[df["baseline"] == "uniform", "test"].iloc[0]
    assert chosen["test"] > uniform
    assert chosen["test"] > df.loc[df["baseline"].str.startswith("source:"), "test"].max()


@pytest.mark.slow
def test_export_reproduces_the_trial_tensors(space, tmp_path, tiny_family, capsys):
    base, fts = tiny_family
    results = tmp_path / "results"
    run_search(
        space,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=results,
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(results / "space")
    # export a dare trial when there is one (random masks: the seed must travel with the recipe)
    dare = df[(df["p_method"] == "dare_ties") & (df["state"] == "COMPLETE")]
    number = int(dare["number"].iloc[0]) if len(dare) else int(df["number"].dropna().iloc[0])
    best = tmp_path / "best.yml"
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(results),
                "--trial",
                str(number),
                "-o",
                str(best),
            ]
        )
        == 0
    )
    text = best.read_text()
    assert (
        f"trial {number}" in text
        and "# evomerge-seed: 1" in text
        and "Contamination and evaluation" in text
    )
    assert "search:" not in yaml.safe_load(text)  # a plain mergekit recipe
    assert main(["merge", str(best), str(tmp_path / "out")]) == 0
    assert digest_model_dir(tmp_path / "out") == df.loc[df["number"] == number, "digest"].iloc[0]
    # default export = best by holdout among finalists; --merge writes the model with a card
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(results),
                "-o",
                str(best),
                "--force",
                "--merge",
                str(tmp_path / "m2"),
            ]
        )
        == 0
    )
    card = (tmp_path / "m2" / "README.md").read_text()
    assert "Contamination and evaluation" in card and "tags:" in card and "- merge" in card
    assert "matches the trial" in capsys.readouterr().out
    # exporting over an existing file needs --force
    assert main(["export", str(space), "--results-dir", str(results), "-o", str(best)]) == 2


@pytest.mark.slow
def test_same_seed_same_recipes_and_tensors(space, tmp_path, tiny_family):
    base, fts = tiny_family
    runs = []
    for name in ("a", "b"):
        run_search(
            space,
            evaluator=TaskVectorEvaluator(base, fts),
            results_dir=tmp_path / name,
            quiet=True,
            log=lambda m: None,
            trials=5,
        )
        df = load_trials(tmp_path / name / "space")
        runs.append(df[df["number"].notna()].sort_values("number"))
    a, b = runs
    pcols = [c for c in a.columns if c.startswith("p_")]
    pd.testing.assert_frame_equal(a[pcols].reset_index(drop=True), b[pcols].reset_index(drop=True))
    assert list(a["digest"]) == list(b["digest"]) and a["digest"].str.len().min() == 64


@pytest.mark.slow
def test_failed_candidates_are_recorded_and_the_study_goes_on(space, tmp_path, tiny_family):
    base, fts = tiny_family
    # reject merges where the first fine-tune's delta is scaled up a lot
    ev = TaskVectorEvaluator(base, fts)
    real = ev.evaluate

    def flaky(model, split="search"):
        r = real(model, split)
        if r.scores.get("task_0", 0) > 0.9 and split == "search":
            raise EvomergeError("evaluation failed: candidate rejected")
        return r

    ev.evaluate = flaky
    out = run_search(
        space, evaluator=ev, results_dir=tmp_path / "r", quiet=True, log=lambda m: None, trials=6
    )
    df = load_trials(out.paths.csv)
    failed = df[(df["state"] == "FAIL") & (df["baseline"] == "")]
    assert len(failed) >= 1 and (failed["error"] == "evaluation failed: candidate rejected").all()
    assert (df[df["baseline"] == ""]["state"] == "COMPLETE").sum() == 6


def test_bad_storage_and_mismatched_architectures_write_nothing(tmp_path, tiny_family):
    from _tiny import make_tiny

    base, fts = tiny_family
    space = write_space(tmp_path / "s.yml", base, fts)
    with pytest.raises(
        EvomergeError, match=r"--storage: cannot open storage sqlite:////nonexistent/dir/x.db"
    ):
        prepare(
            space,
            storage="sqlite:////nonexistent/dir/x.db",
            evaluator=TaskVectorEvaluator(base, fts),
            results_dir=tmp_path / "res",
        )
    other = make_tiny(tmp_path / "gpt2", seed=3, arch="gpt2")
    bad = write_space(tmp_path / "bad.yml", base, [fts[0], other])
    with pytest.raises(ConfigError, match="bad.yml"):
        prepare(bad, evaluator=TaskVectorEvaluator(base, fts[:1]), results_dir=tmp_path / "res")
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"search": {"trials": 0}}, "search.trials: must be a positive integer"),
        ({"parameters": {"lambda": {"range": [1.5, 0.5]}}}, "parameters.lambda.range: empty range"),
        (
            {"parameters": {"lambda": {"ranges": [0.5, 1.5]}}},
            "unknown search directive (did you mean range",
        ),
        (
            {"search": {"sampler": "cmaes"}},
            "search.sampler: cmaes cannot sample categorical parameters (merge_method is a choice); use tpe",
        ),
    ],
)
def test_cli_bad_space_one_line_exit_2_nothing_written(tmp_path, tiny_family, capsys, patch, words):
    base, fts = tiny_family
    path = write_space(tmp_path / "bad.yml", base, fts)
    data = yaml.safe_load(path.read_text())
    for k, v in patch.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) and k != "parameters" else v
    path.write_text(yaml.safe_dump(data))
    code = main(["search", str(path), "--results-dir", str(tmp_path / "res")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: " in err and words in err, err
    assert not (tmp_path / "res").exists()


RUNNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import conftest  # offline env
    from _fake_eval import TaskVectorEvaluator
    from evomerge.search.loop import run_search
    ev = TaskVectorEvaluator({base!r}, {fts!r}, sleep=float(sys.argv[1]), marker={marker!r})
    run_search({space!r}, evaluator=ev, results_dir={results!r}, quiet=True)
    print("DONE")
""")


def _runner(tmp_path, space, base, fts):
    script = tmp_path / "runner.py"
    script.write_text(
        RUNNER.format(
            tests=str(TESTS),
            base=str(base),
            fts=[str(f) for f in fts],
            space=str(space),
            results=str(tmp_path / "results"),
            marker=str(tmp_path / "evaluating"),
        )
    )
    return script


def _wait_for(pred, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _complete(csv: Path) -> pd.DataFrame:
    try:
        df = load_trials(csv)
    except (EvomergeError, pd.errors.EmptyDataError):
        return pd.DataFrame()
    return df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]


@pytest.mark.slow
def test_resume_after_sigkill_loses_nothing(tmp_path, tiny_family):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=6, finalists=2)
    script = _runner(tmp_path, space, base, fts)
    csv = tmp_path / "results" / "space" / "trials.csv"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), "0.4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # kill inside a trial's evaluation, after two trials have completed
        assert _wait_for(lambda: len(_complete(csv)) >= 2 and (tmp_path / "evaluating").exists()), (
            "search did not get going"
        )
        before = _complete(csv)[["number", "digest"]]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rerun = subprocess.run(
        [sys.executable, str(script), "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    df = load_trials(csv)
    searched = df[df["baseline"] == ""]
    done = searched[searched["state"] == "COMPLETE"]
    assert len(done) == 6
    # no completed trial lost, same tensors
    merged = before.merge(
        done[["number", "digest"]], on="number", how="left", suffixes=("", "_after")
    )
    assert (merged["digest"] == merged["digest_after"]).all()
    dead = searched[searched["error"].str.contains("died while this trial was running")]
    assert len(dead) == 1 and (dead["state"] == "FAIL").all()
    dead_no = int(dead["number"].iloc[0])
    retried = searched[searched["retry_of"] == dead_no]
    assert len(retried) == 1 and retried["state"].iloc[0] == "COMPLETE"
    pcols = [c for c in searched.columns if c.startswith("p_")]
    a = dead[pcols].iloc[0].dropna().to_dict()
    assert a == retried[pcols].iloc[0].dropna().to_dict()
    # baselines were not run twice
    assert (df["baseline"].str.startswith("source:")).sum() == 4


@pytest.mark.slow
def test_ctrl_c_fails_the_running_trial_and_exits_130(tmp_path, tiny_family):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=20)
    script = tmp_path / "cli_runner.py"
    script.write_text(
        RUNNER.format(
            tests=str(TESTS),
            base=str(base),
            fts=[str(f) for f in fts],
            space=str(space),
            results=str(tmp_path / "results"),
            marker=str(tmp_path / "evaluating"),
        )
        .replace(
            "run_search(",
            "import evomerge.cli, evomerge.search.loop as st\nst_run = run_search\ndef _go():\n    return st_run(",
        )
        .replace('print("DONE")', "try:\n    _go()\nexcept KeyboardInterrupt:\n    sys.exit(130)\n")
    )
    csv = tmp_path / "results" / "space" / "trials.csv"
    proc = subprocess.Popen(
        [sys.executable, str(script), "0.5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert _wait_for(lambda: len(_complete(csv)) >= 1)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    df = load_trials(csv)
    # the trial that was running is failed as interrupted (when the signal lands between trials,
    # e.g. inside a database commit, the search stops before the next one instead)
    assert (df["error"] == "interrupted (Ctrl-C)").sum() <= 1
    assert not (df["state"] == "RUNNING").any()
    assert ((df["baseline"] == "") & (df["state"] == "COMPLETE")).sum() < 20


@pytest.mark.slow
def test_results_and_report_commands(space, tmp_path, tiny_family, capsys):
    base, fts = tiny_family
    results = tmp_path / "results"
    run_search(
        space,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=results,
        quiet=True,
        log=lambda m: None,
        trials=5,
    )
    assert main(["results", str(space), "--results-dir", str(results), "--top", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "[uniform]" in out and "[source:ft0]" in out and "flags: L = merge_lineage" in out
    searched = [ln for ln in lines if ln.strip().startswith("#")]
    assert len(searched) == 3  # --top 3 searched rows, plus every baseline
    scores = [float(ln.split()[2]) for ln in searched]
    assert scores == sorted(scores, reverse=True)
    assert main(["report", str(space), "--results-dir", str(results)]) == 0
    report = results / "space" / "report"
    for name in (
        "history.png",
        "importance.png",
        "parallel.png",
        "holdout.png",
        "flags.png",
        "report.md",
    ):
        assert (report / name).stat().st_size > 0, name
    # a study that does not exist is a one-line error
    assert main(["results", str(space), "--results-dir", str(tmp_path / "nothing")]) == 2
    assert "no study 'space' yet" in capsys.readouterr().err


def _sampler_run(tmp_path: Path, tiny_family, sampler: str, objectives, name: str) -> list:
    """A 6-trial search of a TIES space (cmaes takes no choice) with 2 startup trials; its trials."""
    import optuna

    base, fts = tiny_family
    path = write_space(
        tmp_path / f"{name}.yml",
        base,
        fts,
        sampler=sampler,
        trials=6,
        startup_trials=2,
        finalists=1,
        **({"objectives": objectives} if objectives else {}),
    )
    data = yaml.safe_load(path.read_text())
    data["merge_method"] = "ties"
    path.write_text(yaml.safe_dump(data))
    out = run_search(
        path,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=tmp_path / name,
        quiet=True,
        log=lambda m: None,
    )
    assert out.chosen is not None
    return optuna.load_study(study_name=name, storage=out.paths.storage).trials


@pytest.mark.parametrize(
    "sampler, objectives",
    [(s, None) for s in SAMPLERS] + [("nsga2", "tasks"), ("tpe", ["task_0", "task_1"])],
)
@pytest.mark.slow
def test_every_sampler_runs_past_its_startup_trials(tmp_path, tiny_family, sampler, objectives):
    # Every name the space accepts must sample after its random startup phase too: a sampler
    # whose package is missing (cmaes) fails only there, at the third trial.
    trials = _sampler_run(tmp_path, tiny_family, sampler, objectives, "space")
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(trials) == len(done) == 6
    n_obj = 3 if objectives == "tasks" else len(objectives or [0])
    assert all(len(t.values) == n_obj for t in done)
    if sampler == "random":
        return
    # The startup trials are the random sampler's draws for the same seed; the later ones are the
    # model's own (they would be the random sampler's again if it fell back to independent sampling).
    plain = _sampler_run(tmp_path, tiny_family, "random", objectives, "plain")
    assert [t.params for t in done[:2]] == [t.params for t in plain[:2]]
    assert all(a.params != b.params for a, b in zip(done[4:], plain[4:], strict=True))
    if sampler == "cmaes":
        assert all(any(k.endswith("generation") for k in t.system_attrs) for t in done[2:])

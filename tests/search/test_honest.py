"""Honest numbers: the trial a user gets is chosen on items its reported score never saw, older
studies still read, and a resumed study goes on where it stopped."""

from __future__ import annotations

import pytest
import yaml
from _fake_eval import TaskVectorEvaluator
from _spaces import dare_space, write_space

from evomerge.cli import main
from evomerge.engine.hashes import digest_model_dir
from evomerge.evaluation.base import split_holdout
from evomerge.search.loop import run_search
from evomerge.search.records import Scores, StudyMeta, StudyRecords, TrialRecord
from evomerge.search.storage import load_study, locate
from evomerge.search.table import chosen_row, load_trials, trials_frame


@pytest.fixture
def space(tmp_path, tiny_family):
    base, fts = tiny_family
    return write_space(tmp_path / "space.yml", base, fts)


def _run(space, tmp_path, tiny_family, **kw):
    base, fts = tiny_family
    ev = TaskVectorEvaluator(base, fts, **kw)
    out = run_search(
        space, evaluator=ev, results_dir=tmp_path / "results", quiet=True, log=lambda m: None
    )
    return out, load_trials(out.paths.csv)


def test_split_holdout_is_disjoint_interleaved_and_covers_the_holdout():
    ids = list(range(100, 131))
    for share in (0.0, 0.25, 0.5, 0.9):
        val, test = split_holdout(ids, share)
        assert sorted(val + test) == ids and not set(val) & set(test)
        assert len(val) == int(len(ids) * share)
        if val:  # spread over the whole range, not its first part
            assert val[-1] > ids[len(ids) // 2]


def test_the_choice_uses_validation_items_and_the_report_test_items(space, tmp_path, tiny_family):
    """Test scores are made to rank the trials backwards (test = -search): the chosen trial is
    still the best by validation, its test score is only reported, and no other searched trial
    was scored on the test items."""
    out, df = _run(space, tmp_path, tiny_family, holdout_scale=0.9, test_scale=-1.0)
    searched = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
    rescored = searched[searched["validation"].notna()]
    assert len(rescored) >= 3
    best_val = rescored.sort_values("validation", ascending=False).iloc[0]
    assert out.chosen["number"] == best_val["number"]
    # a choice by test would have taken the worst trial: the test column played no part
    assert out.chosen["test"] == pytest.approx(-out.chosen["score"])
    assert searched["test"].notna().sum() == 1
    # the export says which items chose it and which scored it
    best = tmp_path / "best.yml"
    assert (
        main(["export", str(space), "--results-dir", str(tmp_path / "results"), "-o", str(best)])
        == 0
    )
    head = [ln for ln in best.read_text().splitlines() if ln.startswith("# ")]
    chose = next(ln for ln in head if ln.startswith("# Chosen by its validation score"))
    assert f"the best of the {len(rescored)} trials re-scored there" in chose
    assert any(ln.startswith("# Test score: ") and "which chose nothing" in ln for ln in head)


def test_without_validation_items_the_search_score_chooses(space, tmp_path, tiny_family):
    out, df = _run(space, tmp_path, tiny_family, validation=False)
    searched = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
    assert searched["validation"].isna().all()  # nothing re-scored to choose
    assert out.chosen["score"] == searched["score"].max()
    assert df.loc[df["chosen"], "chosen_by"].iloc[0] == "search"
    assert searched["test"].notna().sum() == 1 and out.chosen["test"] == pytest.approx(
        0.95 * out.chosen["score"]
    )


def test_a_study_made_before_the_split_reads_and_says_its_holdout_chose(tmp_path):
    """A study written by an earlier evomerge: holdout re-scores (``holdout:<n>``), baselines with
    a ``holdout`` record, no ``selection``: its holdout chose, and every reader says so."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    study = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    records = StudyRecords(study)
    records.set_meta(StudyMeta(search_tasks=["a"], holdout_tasks=["a_holdout"]))
    sc = lambda v: Scores({"a": v}, {"a": 0.02}, v, 0.02, 1.0, 100)  # noqa: E731
    for number, (search, holdout) in enumerate([(0.8, 0.6), (0.7, 0.75), (0.5, None)]):
        t = study.ask()
        StudyRecords.set_trial(
            t, TrialRecord(method="ties", recipe="merge_method: ties\n", search=sc(search))
        )
        study.tell(t, search)
        if holdout is not None:
            records.set_rescore(number, "holdout", sc(holdout))
    records.set_baseline(
        "uniform", TrialRecord(method="linear", state="COMPLETE", search=sc(0.4), holdout=sc(0.45))
    )
    df = trials_frame(study)
    assert chosen_row(df)["number"] == 1  # the best holdout, as before
    row = df[df["chosen"]].iloc[0]
    assert row["chosen_by"] == "holdout" and row["validation"] == 0.75
    assert df.loc[df["baseline"] == "uniform", "validation"].iloc[0] == 0.45
    from evomerge.results.provenance import evaluation_lines

    lines = evaluation_lines(df, row)
    assert any("made before evomerge kept test items apart" in ln for ln in lines)
    assert lines[-1] == "Test score: none (the study has no test items)"


@pytest.mark.slow
def test_a_resumed_study_goes_on_where_it_stopped(tmp_path, tiny_family):
    """Three trials, then a resume to six, propose the same six points as one run of six: the
    resumed sampler neither repeats the first three nor depends on the interruption."""
    base, fts = tiny_family
    split = write_space(tmp_path / "split.yml", base, fts, trials=3, finalists=1)
    whole = write_space(tmp_path / "whole.yml", base, fts, trials=6, finalists=1)
    ev = TaskVectorEvaluator(base, fts)
    kw = dict(evaluator=ev, results_dir=tmp_path / "r", quiet=True, log=lambda m: None)
    run_search(split, **kw)
    run_search(split, trials=6, **kw)
    run_search(whole, **kw)

    def points(name):
        study = load_study(locate(tmp_path / f"{name}.yml", results_dir=tmp_path / "r"))
        return [tuple(sorted(t.params.items())) for t in study.trials if t.params]

    resumed, once = points("split"), points("whole")
    assert len(resumed) == 6 and len(set(resumed)) == 6
    assert resumed == once


@pytest.mark.slow
def test_a_study_made_before_streams_resumes_with_stream_1(tmp_path, tiny_family):
    """A study that recorded no random stream merged its masks with stream 1: its resumed trials
    do too (the merger is built with the study's stream), so their exports re-merge to them."""
    base, fts = tiny_family
    space = dare_space(tmp_path / "s.yml", base, fts, trials=1)
    kw = dict(
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    run_search(space, **kw)
    study = load_study(locate(space, results_dir=tmp_path / "r"))
    assert study.user_attrs["stream"] == 2
    study.set_user_attr("stream", None)  # as a study made before streams were recorded
    df = load_trials(run_search(space, trials=2, **kw).paths.csv)
    resumed = df[(df["baseline"] == "") & (df["number"] > 0)].iloc[0]
    out = tmp_path / "t.yml"
    args = ["export", str(space), "--results-dir", str(tmp_path / "r"), "-o", str(out)]
    assert main([*args, "--trial", str(resumed["number"]), "--merge", str(tmp_path / "m")]) == 0
    assert "# evomerge-seed: 3 stream 1" in out.read_text()
    assert digest_model_dir(tmp_path / "m") == resumed["digest"]


@pytest.mark.slow
def test_baseline_recipe_changed_is_scored_again(tmp_path, tiny_family):
    base, fts = tiny_family
    hand = tmp_path / "hand.yml"
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    hand.write_text(yaml.safe_dump(recipe))
    space = write_space(
        tmp_path / "space.yml",
        base,
        fts,
        trials=2,
        finalists=1,
        baselines=[{"name": "mine", "recipe": "hand.yml"}],
    )
    lines: list[str] = []
    kw = dict(
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lines.append,
    )
    run_search(space, **kw)
    before = load_trials(tmp_path / "r" / "space")
    old = before.loc[before["baseline"] == "hand:mine", "s_task_1"].iloc[0]
    recipe["models"][0]["model"] = str(fts[1])
    hand.write_text(yaml.safe_dump(recipe))
    run_search(space, **kw)
    after = load_trials(tmp_path / "r" / "space")
    rows = after[after["baseline"] == "hand:mine"]
    assert len(rows) == 1 and rows["s_task_1"].iloc[0] != old
    assert rows["s_task_1"].iloc[0] == pytest.approx(1.0)  # now the second fine-tune alone
    assert "baseline hand:mine: its recipe changed since it was scored; scoring it again" in lines

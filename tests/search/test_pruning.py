"""Stopping hopeless candidates early (``search.prune``): the paired rule by hand, rounds that add up
to the full evaluation (fake evaluator and lm-eval with few-shot prompts), PRUNED trials in the table,
the leaderboard and the budget, no reuse of a partial score, resume, and the setting's validation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml
from _long_task import LONG_TASK, SMALL, write_long_task

from evomerge.errors import ConfigError
from evomerge.evaluation import EvalConfig, FakeEvaluator, TaskSpec
from evomerge.evaluation.base import item_weights
from evomerge.evaluation.fake import layer_stats
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.results.leaderboard import leaderboard, main_results
from evomerge.search.loop import run_search
from evomerge.search.pruning import Pruner
from evomerge.search.records import Scores, StudyRecords, TrialRecord
from evomerge.search.table import load_trials
from evomerge.space import load_space
from evomerge.space.prune import PruneSettings

# --------------------------------------------------------------------------------- the paired rule


def test_rounds_cover_every_item_once_in_a_fixed_order():
    p = Pruner(PruneSettings(rounds=(0.1, 0.25, 1.0)), {"a": 40, "b": 7}, {"a": 1.0, "b": 1.0})
    rounds = p.rounds()
    assert [len(r["a"]) for r in rounds] == [4, 6, 30] and [len(r["b"]) for r in rounds] == [
        1,
        1,
        5,
    ]  # ceil(0.1*7)=1, ceil(0.25*7)=2
    for task, n in (("a", 40), ("b", 7)):
        got = [i for r in rounds for i in r[task]]
        assert sorted(got) == list(
            range(n)
        )  # the rounds' union is the full item set, no item twice
    assert (
        rounds
        == Pruner(
            PruneSettings(rounds=(0.1, 0.25, 1.0)), {"a": 40, "b": 7}, {"a": 1.0, "b": 1.0}
        ).rounds()
    )  # same items for every candidate
    assert rounds[0]["a"] != list(range(4))  # shuffled: a task sorted by topic is sampled evenly


def test_paired_rule_by_hand():
    # 5 of 10 items scored; differences d = candidate - reference = [-1, -1, 0, 0, 0]:
    # mean -0.4, sample sd sqrt(1.2 / 4) = 0.5477, se = 0.5477 / sqrt(5) * sqrt(1 - 5/10) = 0.1732.
    # z(0.99) = 2.326: bound -0.4 + 0.403 = +0.003 >= 0, kept; z(0.95) = 1.645: -0.4 + 0.285 < 0, stopped.
    ref = {"a": [1.0] * 10}
    seen = {"a": {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}}
    strict = Pruner(PruneSettings(rounds=(0.5, 1.0), alpha=0.01), {"a": 10}, {"a": 1.0})
    loose = Pruner(PruneSettings(rounds=(0.5, 1.0), alpha=0.05), {"a": 10}, {"a": 1.0})
    assert not strict.hopeless(seen, ref)
    assert loose.hopeless(seen, ref)
    # no evidence against: equal items, or better ones, never stop
    assert not loose.hopeless({"a": {i: 1.0 for i in range(5)}}, ref)
    assert not loose.hopeless({"a": {0: 1.0, 1: 0.0}}, {"a": [0.0] * 10})
    # every item scored: nothing to predict, the full score decides (no stop)
    assert not loose.hopeless({"a": {i: 0.0 for i in range(10)}}, ref)


def test_paired_difference_by_hand():
    # the example above: d = [-1, -1, 0, 0, 0], mean -0.4, se 0.1732 (5 of 10 items)
    p = Pruner(PruneSettings(rounds=(0.5, 1.0)), {"a": 10}, {"a": 1.0})
    mean, se = p.difference({"a": {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}}, {"a": [1.0] * 10})
    assert mean == pytest.approx(-0.4) and se == pytest.approx(
        math.sqrt(0.3) / math.sqrt(5) * math.sqrt(0.5)
    )
    # the items scored need not be the first ones: the reference's value of the same item is taken
    assert p.difference({"a": {7: 1.0, 9: 0.0}}, {"a": [0.0] * 7 + [0.0, 1.0, 1.0]})[
        0
    ] == pytest.approx(0.0)


def test_item_weights_make_the_mean_the_aggregate():
    specs = [TaskSpec("a", weight=1.0), TaskSpec("b", weight=3.0)]
    w = item_weights(specs, {"a": 4, "b": 12})
    a, b = (
        [1, 0, 0, 1],
        [1] * 3 + [0] * 9,
    )  # task means 0.5 and 0.25; aggregate (0.5 + 3 * 0.25) / 4
    mean = (sum(w["a"] * x for x in a) + sum(w["b"] * x for x in b)) / 16
    assert mean == pytest.approx((0.5 + 3 * 0.25) / 4)
    p = Pruner(PruneSettings(rounds=(0.5, 1.0)), {"a": 4, "b": 12}, w)
    part = p.partial({"a": {0: 1.0, 1: 0.0}, "b": {0: 1.0, 5: 0.0, 6: 0.0, 7: 0.0}}, 0.0)
    assert part.aggregate == pytest.approx((0.5 + 3 * 0.25) / 4) and part.n_items == 6
    assert part.values["a"] == [1.0, 0.0, None, None]


# ------------------------------------------------------------------ rounds add up to the full evaluation


def test_fake_staged_rounds_equal_the_full_evaluation(tiny_family):
    from transformers import AutoModelForCausalLM

    base, fts = tiny_family
    model = AutoModelForCausalLM.from_pretrained(fts[0])
    stats = layer_stats(model)
    ev = FakeEvaluator.layer_targets(
        {"a": (stats + 0.01).tolist(), "b": stats.tolist()}, width=4e-4, items=50
    )
    full = ev.evaluate(model)
    assert 0 < full.scores["a"] < 1 and full.scores["b"] == 1.0
    ev.items_scored = 0
    staged = ev.staged(model)
    got = staged.score({"a": [3, 1], "b": [0]})
    assert got == {"a": {3: full.values["a"][3], 1: full.values["a"][1]}, "b": {0: 1.0}}
    result = staged.result()
    assert (result.scores, result.stderr, result.aggregate, result.values) == (
        full.scores,
        full.stderr,
        full.aggregate,
        full.values,
    )
    assert ev.items_scored == 100  # each item once, the three scored early included


@pytest.fixture(scope="module")
def long_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    write_long_task(folder, n=16)
    (folder / f"{LONG_TASK}_n.yaml").write_text(
        (folder / f"{LONG_TASK}.yaml")
        .read_text()
        .replace(f"task: {LONG_TASK}\n", f"task: {LONG_TASK}_n\n")
    )
    return folder


def test_lm_eval_rounds_equal_the_full_evaluation(long_tasks, tmp_path, monkeypatch):
    """Few-shot prompts (4 shots, drawn in doc order) stay those of the full evaluation, every
    request runs once, and the result is lm-eval's full result."""
    from _tiny import make_tiny
    from transformers import AutoModelForCausalLM

    import evomerge.evaluation.lmeval as lmeval
    from evomerge.zoo.data import make_tokenizer

    tok = make_tokenizer()
    tok.model_max_length = 1024
    model = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "m", seed=3, **SMALL)).eval()
    seen: list[tuple] = []
    make = lmeval.make_lm

    def recording(*args, **kwargs):
        lm = make(*args, **kwargs)
        score = lm.loglikelihood
        lm.loglikelihood = lambda reqs, disable_tqdm=False: (
            seen.extend(r.args for r in reqs) or score(reqs)
        )
        return lm

    monkeypatch.setattr(lmeval, "make_lm", recording)
    cfg = EvalConfig(
        [TaskSpec(LONG_TASK), TaskSpec(LONG_TASK + "_n", "acc_norm", weight=2.0)],
        include_path=[str(long_tasks)],
    )
    ev = LMEvalEvaluator(cfg, tok, batch_size=8)
    full = ev.evaluate(model)
    requests = list(seen)
    assert len(requests) == 2 * 16 * 4 and ev.item_counts() == {LONG_TASK: 16, LONG_TASK + "_n": 16}
    assert all(v in (0.0, 1.0) for v in full.values[LONG_TASK]) and math.isclose(
        sum(full.values[LONG_TASK]) / 16, full.scores[LONG_TASK]
    )
    seen.clear()
    p = Pruner(
        PruneSettings(rounds=(0.25, 0.5, 1.0)),
        ev.item_counts(),
        item_weights(ev.specs(), ev.item_counts()),
    )
    staged = ev.staged(model)
    for items in p.rounds()[:2]:
        got = staged.score(items)
        for task, vals in got.items():
            assert vals and all(full.values[task][i] == v for i, v in vals.items())
    assert staged.scored == 2 * 8
    result = staged.result()
    assert (result.scores, result.stderr, result.aggregate, result.values) == (
        full.scores,
        full.stderr,
        full.aggregate,
        full.values,
    )
    assert sorted(seen) == sorted(requests)  # the same prompts, each run once


# ------------------------------------------------------------------------------------- in a search


def _space(path: Path, base: Path, fts: list[Path], **search) -> Path:
    space = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": {"range": [0.0, 1.5]}}} for f in fts],
        "dtype": "float32",
        "search": {
            "trials": 12,
            "seed": 0,
            "finalists": 2,
            "sampler": "random",
            "prune": {"rounds": [0.2, 1.0], "alpha": 0.05},
            **search,
        },
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _evaluator(base: Path, fts: list[Path]) -> FakeEvaluator:
    """Task ``a`` wants the first fine-tune's delta at weight ~1 and nothing of the others: most
    random points are far off, so most trials are hopeless against the best one."""
    from transformers import AutoModelForCausalLM

    s0, *s = [layer_stats(AutoModelForCausalLM.from_pretrained(m)) for m in (base, *fts)]
    width = sum(float(((x - s0) ** 2).sum()) for x in s)
    return FakeEvaluator.layer_targets(
        {"a": s[0].tolist(), "b": s[0].tolist()}, width=width, items=60
    )


def _rescore(df_row, ev: FakeEvaluator, base: Path, fts: list[Path]) -> float:
    from evomerge.engine.merger import Merger
    from evomerge.engine.sources import open_sources
    from evomerge.recipe.schema import parse_recipe

    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(f), "parameters": {"weight": float(df_row[f"p_weight.{f.name}"])}}
            for f in fts
        ],
    }
    merger = Merger(open_sources([str(base), *map(str, fts)], file="test"), resident=True)
    plan = merger.plan(parse_recipe(recipe, "test"))
    model = merger.build_model(plan)
    merger.merge_into(model, plan)
    return ev.evaluate(model).aggregate


@pytest.mark.slow
def test_hopeless_trials_are_pruned_and_survivors_keep_their_full_score(
    tmp_path, tiny_family, capsys
):
    base, fts = tiny_family
    ev = _evaluator(base, fts)
    out = run_search(
        _space(tmp_path / "space.yml", base, fts),
        evaluator=ev,
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    pruned, complete = (
        searched[searched["state"] == "PRUNED"],
        searched[searched["state"] == "COMPLETE"],
    )
    assert (
        len(pruned) >= 3 and len(pruned) + len(complete) == 12 == out.n_complete + out.n_pruned
    )  # pruned trials count against the budget
    best = complete["score"].max()
    import optuna

    records = StudyRecords(optuna.load_study(study_name=out.paths.name, storage=out.paths.storage))
    trials = {t.number: records.trial(t) for t in records.study.get_trials()}
    for _, row in pruned.iterrows():
        assert row["items"] == 2 * 12  # stopped after the first round: 20% of 60 items per task
        assert (
            _rescore(row, ev, base, fts) < best
        )  # the answer is known: its full score would not have beaten the best
        assert math.isnan(row["validation"])  # never a finalist
        # its estimate: the reference's full score (the best complete trial before it) plus the mean
        # per-item difference on the 24 items it scored (tasks of equal size and weight)
        ref = (
            complete[complete["number"] < row["number"]]
            .sort_values(["score", "number"], ascending=[False, True])
            .iloc[0]
        )
        seen, rv = (
            trials[int(row["number"])].search.values,
            trials[int(ref["number"])].search.values,
        )
        d = [v - rv[t][i] for t in seen for i, v in enumerate(seen[t]) if v is not None]
        assert (
            len(d) == 24
            and row["estimate"] == pytest.approx(ref["score"] + sum(d) / 24, abs=1e-12)
            and row["estimate"] < ref["score"]
        )
    for _, row in complete.iterrows():
        assert math.isnan(row["estimate"])
        assert row["items"] == 120
        assert row["score"] == pytest.approx(
            _rescore(row, ev, base, fts), abs=1e-12
        )  # the unpruned score
    assert out.chosen["state"] == "COMPLETE"
    assert out.items["trials"] == int(searched["items"].sum()) < 12 * 120
    # the leaderboard: pruned rows with --all, with their items; a line about them otherwise
    text = leaderboard(df, show_all=True)
    assert any(
        line.split()[1] == "PRUNED" and " 24 " in line
        for line in text.splitlines()[2:]
        if line.split()
    )
    first = pruned.sort_values("number").iloc[0]
    assert f"(estimate {first['estimate']:.3f})" in next(
        line for line in text.splitlines() if line.split()[:1] == [f"#{first['number']}"]
    )
    assert f"{len(pruned)} trials stopped early" in leaderboard(df)
    assert main_results(str(tmp_path / "space.yml"), results_dir=str(tmp_path / "r")) == 0
    printed = capsys.readouterr().out
    assert (
        f"{len(pruned)} pruned" in printed
        and f"items evaluated: {out.items['trials']} search items by trials" in printed
    )


@pytest.mark.slow
def test_resume_keeps_pruned_trials_and_counts_them(tmp_path, tiny_family):
    base, fts = tiny_family
    space = _space(tmp_path / "space.yml", base, fts, trials=6)
    run_search(
        space,
        evaluator=_evaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    first = load_trials(tmp_path / "r" / "space")
    out = run_search(
        space,
        evaluator=_evaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
        trials=12,
    )
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    assert (
        len(searched) == 12
        and set(searched["state"]) <= {"COMPLETE", "PRUNED"}
        and (searched["state"] == "PRUNED").any()
    )
    old = first[first["baseline"] == ""].set_index("number")
    new = searched.set_index("number")
    for n, row in old.iterrows():  # the first run's trials are unchanged, pruned ones included
        assert (
            new.loc[n, "state"] == row["state"]
            and new.loc[n, "items"] == row["items"]
            and new.loc[n, "score"] == row["score"]
        )


@pytest.mark.slow
def test_item_budget_stops_the_search_and_resumes(tmp_path, tiny_family):
    """``search.items``: no trial starts once the searched trials scored that many search items (a
    stopped trial counts the items it used); a resumed study keeps the budget, a larger one goes on."""
    base, fts = tiny_family
    space = _space(tmp_path / "space.yml", base, fts, trials=60, items=600)
    out = run_search(
        space,
        evaluator=_evaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    searched = load_trials(out.paths.csv).query("baseline == ''").sort_values("number")
    spent = searched["items"].cumsum()
    assert (
        600 <= spent.iloc[-1] < 600 + 120 and spent.iloc[-2] < 600
    )  # the last trial crossed the budget
    assert (
        len(searched) < 60
        and (searched["state"] == "PRUNED").any()
        and out.items["trials"] == spent.iloc[-1]
    )
    logged: list[str] = []
    again = run_search(
        space,
        evaluator=_evaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=logged.append,
    )
    assert len(load_trials(again.paths.csv).query("baseline == ''")) == len(
        searched
    )  # resumed: the budget is spent
    assert any("item budget reached" in m for m in logged)
    more = _space(tmp_path / "space.yml", base, fts, trials=60, items=900)
    out = run_search(
        more,
        evaluator=_evaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    assert 900 <= out.items["trials"] < 900 + 120


def _study_of(rows: list[tuple[float, float, str, float]], sampler=None):
    """A study of trials (x, y, state, value): COMPLETE ones at ``value``, PRUNED ones with a
    partial score of 0 and ``value`` as their record's estimate."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dist = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    for x, y, state, v in rows:
        if state == "PRUNED":
            t = create_trial(
                params={"x": x, "y": y},
                distributions=dist,
                state=TrialState.PRUNED,
                intermediate_values={10: 0.0},
                user_attrs={"result": TrialRecord(estimate=v).to_dict()},
            )
        else:
            t = create_trial(
                params={"x": x, "y": y},
                distributions=dist,
                value=v,
                user_attrs={"result": TrialRecord().to_dict()},
            )
        study.add_trial(t)
    return study


def _proposals(study, n: int = 3) -> list[tuple[float, float]]:
    from optuna.trial import TrialState

    out = []
    for _ in range(n):
        t = study.ask()
        out.append((t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)))
        study.tell(t, state=TrialState.FAIL)
    return out


@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_the_sampler_sees_a_stopped_trial_at_its_estimate(name):
    """With pruning on, tpe and gp propose what they would if each stopped trial had finished at
    its estimate (the near-best stopped points stay in TPE's good group; gp learns from them and
    counts them towards its startup), not what Optuna does with PRUNED trials."""
    from evomerge.search.samplers import StoppedAsEstimated, make_sampler

    rng = random.Random(0)
    points = [(rng.random(), rng.random()) for _ in range(16)]
    values = [1 - (x - 0.8) ** 2 - (y - 0.2) ** 2 for x, y in points]
    rank = sorted(range(16), key=lambda i: -values[i])
    # the best point finished; the next three were stopped just short of it, as were most others
    stopped = set(rank[1:4]) | {i for i in rank[4:] if i % 3}
    rows = [
        (x, y, "PRUNED" if i in stopped else "COMPLETE", values[i])
        for i, (x, y) in enumerate(points)
    ]
    wrapped = make_sampler(name, 7, 40, startup=6, stopped_as_estimated=True)
    assert isinstance(wrapped.make(0), StoppedAsEstimated)  # inside the per-trial seeding
    finished = [(x, y, "COMPLETE", v) for x, y, _, v in rows]
    got = _proposals(_study_of(rows, wrapped))
    assert got == _proposals(_study_of(finished, make_sampler(name, 7, 40, startup=6)))
    assert got != _proposals(
        _study_of(rows, make_sampler(name, 7, 40, startup=6))
    )  # as Optuna sees PRUNED trials
    assert not isinstance(
        make_sampler("random", 7, 40, stopped_as_estimated=True).make(0), StoppedAsEstimated
    )


def test_a_partial_score_is_never_reused(tmp_path):
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(direction="maximize")
    part = Scores({"a": 0.9}, {"a": 0.1}, 0.9, 0.1, 0.0, 10, {"a": [1.0] * 10 + [None] * 30})
    for state in (TrialState.PRUNED, TrialState.COMPLETE):
        t = study.ask()
        StudyRecords.set_trial(
            t, TrialRecord(digest="same" if state == TrialState.PRUNED else "other", search=part)
        )
        study.tell(t, state=state) if state == TrialState.PRUNED else study.tell(t, 0.9)
    records = StudyRecords(study)
    assert records.scored("same") is None  # the pruned trial's tensors are scored afresh
    assert records.scored("other") is not None


# --------------------------------------------------------------------------------------- the setting


def _load(tmp_path: Path, search: dict) -> object:
    p = tmp_path / "s.yml"
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": 1.0}}],
                "search": search,
            }
        )
    )
    return load_space(p)


def test_prune_setting_defaults_and_off(tmp_path):
    assert _load(tmp_path, {}).search.prune == PruneSettings()
    assert _load(tmp_path, {"prune": True}).search.prune == PruneSettings()
    assert _load(tmp_path, {"prune": False}).search.prune is None
    got = _load(tmp_path, {"prune": {"rounds": [0.5, 1], "against": 3, "alpha": 0.1}}).search.prune
    assert got == PruneSettings((0.5, 1.0), 3, 0.1)
    assert (
        _load(tmp_path, {"objectives": "tasks"}).search.prune is None
    )  # several objectives: off by default


@pytest.mark.parametrize(
    "prune, field, says",
    [
        ({"round": [1.0]}, "search.prune.round", "did you mean rounds"),
        ({"rounds": [0.5, 0.25, 1.0]}, "search.prune.rounds", "rise strictly"),
        ({"rounds": [0.25, 0.5]}, "search.prune.rounds", "end at 1.0"),
        ({"rounds": []}, "search.prune.rounds", "list of shares"),
        ({"rounds": [0, 1]}, "search.prune.rounds", "within (0, 1]"),
        ({"against": 0}, "search.prune.against", "positive integer"),
        ({"alpha": 0.7}, "search.prune.alpha", "(0, 0.5)"),
        ("yes", "search.prune", "true, false or a mapping"),
    ],
)
def test_prune_setting_errors_name_the_field(tmp_path, prune, field, says):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, {"prune": prune})
    msg = str(e.value)
    assert field in msg and says in msg and "\n" not in msg and "s.yml" in msg


def test_prune_with_several_objectives_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="search.prune.*several objectives"):
        _load(tmp_path, {"objectives": "tasks", "prune": {"alpha": 0.05}})


def test_cli_prune_error_is_one_line_exit_2(tmp_path, capsys):
    from evomerge.cli import main

    p = tmp_path / "s.yml"
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": 1.0}}],
                "search": {"prune": {"alpha": 1}},
            }
        )
    )
    assert main(["search", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "search.prune.alpha" in err

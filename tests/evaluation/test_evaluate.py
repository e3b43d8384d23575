"""The ``evaluate:`` section and the lm-eval adapter, on the micro zoo's local tasks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluation import (
    PRESETS,
    EvalConfig,
    FakeEvaluator,
    TaskSpec,
    parse_evaluate,
)
from evomerge.evaluation.fake import layer_stats
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.zoo.data import Item, make_tokenizer
from evomerge.zoo.train import score_items

pytestmark = pytest.mark.slow
FILE = "space.yml"


def _items(zoo: Path, task: str) -> list[Item]:
    rows = [json.loads(line) for line in (zoo / "tasks" / f"{task}.jsonl").read_text().splitlines()]
    return [Item(task, r["prompt"], tuple(r["choices"]), r["label"]) for r in rows]


def _model(zoo: Path, name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo / name)


@pytest.fixture(scope="module")
def tok(micro_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_zoo / "base")


def test_parse_full_section(micro_zoo):
    cfg = parse_evaluate(
        {
            "include_path": "zoo:micro",
            "tasks": [
                "zoo_rot",
                {"name": "zoo_sort", "metric": "acc_norm", "weight": 2, "num_fewshot": 0},
            ],
            "limit": 20,
            "holdout": {"tasks": ["zoo_rot_holdout", "zoo_sort_holdout"], "limit": 10},
            "batch_size": 8,
        },
        FILE,
        Path("."),
    )
    assert cfg.search == [TaskSpec("zoo_rot"), TaskSpec("zoo_sort", "acc_norm", 2.0, 0)]
    assert [t.name for t in cfg.holdout] == ["zoo_rot_holdout", "zoo_sort_holdout"]
    assert cfg.include_path == [str((micro_zoo / "tasks").resolve())]
    assert (cfg.limit, cfg.holdout_limit, cfg.batch_size, cfg.preset) == (20, 10, 8, None)


def test_parse_relative_include_and_preset(micro_zoo):
    cfg = parse_evaluate(
        {"include_path": "tasks", "preset": "open_llm_v1", "tasks": ["zoo_shift"]}, FILE, micro_zoo
    )
    assert cfg.include_path == [str((micro_zoo / "tasks").resolve())]
    got = {t.name: (t.metric, t.num_fewshot) for t in cfg.search}
    assert (
        got["arc_challenge"] == ("acc_norm", 25)
        and got["gsm8k"] == ("exact_match", 5)
        and got["mmlu"] == ("acc", 5)
    )
    assert got["zoo_shift"] == ("acc", None) and len(got) == len(PRESETS["open_llm_v1"]) + 1


def _copy_task(micro_zoo: Path, dest: Path, src: str, new: str) -> None:
    dest.mkdir(exist_ok=True)
    shutil.copy(micro_zoo / "tasks" / f"{src}.jsonl", dest / f"{new}.jsonl")
    text = (micro_zoo / "tasks" / f"{src}.yaml").read_text()
    text = text.replace(f"task: {src}\n", f"task: {new}\n").replace(
        str(micro_zoo / "tasks" / f"{src}.jsonl"), str(dest / f"{new}.jsonl")
    )
    (dest / f"{new}.yaml").write_text(text)


BAD = [
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "lmit": 5},
        "evaluate.lmit",
        "did you mean limit",
    ),
    (
        {"include_path": "no/such/dir", "tasks": ["zoo_rot"]},
        "evaluate.include_path",
        "does not exist",
    ),
    (
        {"include_path": "zoo:giant", "tasks": ["zoo_rot"]},
        "evaluate.include_path",
        "unknown zoo task folder",
    ),
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "limit": 0},
        "evaluate.limit",
        "integer >= 1",
    ),
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "limit": "ten"},
        "evaluate.limit",
        "integer >= 1",
    ),
    (
        {"include_path": "zoo:micro", "tasks": [{"name": "zoo_rot", "weight": -1}]},
        "evaluate.tasks[0].weight",
        "positive",
    ),
    (
        {"include_path": "zoo:micro", "tasks": [{"name": "zoo_rot", "shots": 3}]},
        "evaluate.tasks[0].shots",
        "unknown key",
    ),
    ({"include_path": "zoo:micro", "tasks": ["zoo_rot", "zoo_rot"]}, "evaluate.tasks[1]", "twice"),
    (
        {"include_path": "zoo:micro", "preset": "open_llm"},
        "evaluate.preset",
        "did you mean open_llm_v1",
    ),
    (
        {"include_path": "zoo:micro", "preset": ["open_llm_v1"]},
        "evaluate.preset",
        "must be one preset name",
    ),
    ({"include_path": "zoo:micro"}, "evaluate.tasks", "at least one task"),
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "holdout": {"tasks": ["zoo_rot"]}},
        "evaluate.holdout.tasks[0]",
        "also a search task",
    ),
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "holdout": {"limit": 10}},
        "evaluate.holdout.limit",
        "evaluate.limit must be set",
    ),
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "holdout": {"size": 10}},
        "evaluate.holdout.size",
        "unknown key",
    ),
    (
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "holdout": {}},
        "evaluate.holdout",
        "give tasks",
    ),
]


@pytest.mark.parametrize("section,field,fragment", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_parse_errors_name_file_and_field(micro_zoo, section, field, fragment):
    with pytest.raises(ConfigError) as e:
        parse_evaluate(section, FILE, Path("."))
    assert e.value.file == FILE and e.value.field == field, str(e.value)
    assert fragment in str(e.value) and str(e.value).startswith(f"{FILE}: {field}: ")


def test_holdout_task_with_the_search_items_is_refused(micro_zoo, tmp_path):
    _copy_task(micro_zoo, tmp_path / "t", "zoo_rot", "zoo_rot_again")
    section = {
        "include_path": ["zoo:micro", str(tmp_path / "t")],
        "tasks": ["zoo_rot"],
        "holdout": {"tasks": ["zoo_rot_again"]},
    }
    with pytest.raises(ConfigError) as e:
        parse_evaluate(section, FILE, Path("."))
    assert (
        e.value.field == "evaluate.holdout.tasks[0]"
        and "shares items with search task 'zoo_rot'" in str(e.value)
    )
    # The zoo's own holdout task shares nothing with it.
    ok = parse_evaluate({**section, "holdout": {"tasks": ["zoo_rot_holdout"]}}, FILE, Path("."))
    assert ok.holdout == [TaskSpec("zoo_rot_holdout")]


def test_unknown_task_lists_close_names(micro_zoo):
    with pytest.raises(ConfigError) as e:
        parse_evaluate(
            {"include_path": "zoo:micro", "tasks": ["zoo_rot", "zoo_rotv"]}, FILE, Path(".")
        )
    assert e.value.field == "evaluate.tasks[1]"
    assert (
        "unknown lm-eval task 'zoo_rotv'" in str(e.value)
        and "zoo_rot" in str(e.value).split("did you mean")[1]
    )


def test_scores_match_a_hand_scorer_and_experts_win(micro_zoo, tok):
    cfg = parse_evaluate(
        {
            "include_path": "zoo:micro",
            "tasks": ["zoo_rot", {"name": "zoo_shift", "weight": 3}],
            "limit": 24,
        },
        FILE,
        Path("."),
    )
    ev = LMEvalEvaluator(cfg, tok, batch_size=16)
    hand_tok = make_tokenizer()
    res = {}
    for name in ("base", "rot", "shift"):
        model = _model(micro_zoo, name)
        r = ev.evaluate(model)
        res[name] = r
        assert r.counts() == {"zoo_rot": 24, "zoo_shift": 24}
        for task in ("zoo_rot", "zoo_shift"):
            # Same rule as lm-eval's acc, computed independently over the first 24 items.
            assert (
                abs(r.scores[task] - score_items(model, hand_tok, _items(micro_zoo, task)[:24]))
                <= 1 / 24 + 1e-9
            )
            p = r.scores[task]
            assert r.stderr[task] == pytest.approx(math.sqrt(p * (1 - p) / 23), abs=1e-9)
        assert r.aggregate == pytest.approx((r.scores["zoo_rot"] + 3 * r.scores["zoo_shift"]) / 4)
        assert r.aggregate_se == pytest.approx(
            math.sqrt(r.stderr["zoo_rot"] ** 2 + 9 * r.stderr["zoo_shift"] ** 2) / 4
        )
    assert res["rot"].scores["zoo_rot"] >= res["base"].scores["zoo_rot"] + 0.25
    assert res["shift"].scores["zoo_shift"] >= res["base"].scores["zoo_shift"] + 0.25
    assert res["rot"].scores["zoo_rot"] > res["shift"].scores["zoo_rot"]


def test_no_answers_shared_between_candidates(micro_zoo, tok):
    """The same prompts are scored for two different models in a row: each gets its own answers."""
    cfg = parse_evaluate(
        {"include_path": "zoo:micro", "tasks": ["zoo_sort"], "limit": 24}, FILE, Path(".")
    )
    ev = LMEvalEvaluator(cfg, tok)
    sort, base = _model(micro_zoo, "sort"), _model(micro_zoo, "base")
    before = [p.clone() for p in sort.parameters()]
    first = ev.evaluate(sort).scores["zoo_sort"]
    other = ev.evaluate(base).scores["zoo_sort"]
    again = ev.evaluate(sort).scores["zoo_sort"]
    assert first == again and first >= other + 0.25
    assert all(
        torch.equal(a, b) for a, b in zip(before, sort.parameters(), strict=False)
    )  # scoring leaves weights alone


def test_holdout_by_doc_range_is_disjoint(micro_zoo, tok):
    cfg = parse_evaluate(
        {
            "include_path": "zoo:micro",
            "tasks": ["zoo_rot", "zoo_sort"],
            "limit": 20,
            "holdout": {"limit": 15},
        },
        FILE,
        Path("."),
    )
    ev = LMEvalEvaluator(cfg, tok)
    search, holdout = ev.texts("search"), ev.texts("holdout")
    for task in ("zoo_rot", "zoo_sort"):
        items = _items(micro_zoo, task)
        assert search[task] == [f"{it.prompt} {it.answer}" for it in items[:20]]
        assert holdout[task] == [f"{it.prompt} {it.answer}" for it in items[20:35]]
        assert set(search[task]).isdisjoint(holdout[task])
    r = ev.evaluate(_model(micro_zoo, "rot"), "holdout")
    assert r.counts() == {"zoo_rot": 15, "zoo_sort": 15}
    assert ev.task_names("holdout") == ["zoo_rot", "zoo_sort"]
    assert ev.datasets()["zoo_rot"][-1].endswith("zoo_rot.jsonl")


def test_validation_and_test_items_split_the_holdout(micro_zoo, tok):
    """Validation items (which choose) and test items (which report) are disjoint, interleaved
    over the holdout, and together all of it; each split scores only its own items."""
    section = {
        "include_path": "zoo:micro",
        "tasks": ["zoo_rot", "zoo_sort"],
        "limit": 20,
        "holdout": {"limit": 15, "validation": 0.4},
    }
    ev = LMEvalEvaluator(parse_evaluate(section, FILE, Path(".")), tok)
    hold, val, test = ev.texts("holdout"), ev.texts("validation"), ev.texts("test")
    for task in ("zoo_rot", "zoo_sort"):
        assert len(val[task]) == 6 and len(test[task]) == 9
        assert set(val[task]).isdisjoint(test[task]) and sorted(val[task] + test[task]) == sorted(
            hold[task]
        )
        assert val[task][-1] in hold[task][10:]  # spread over the range, not its first part
    model = _model(micro_zoo, "rot")
    rv, rt = ev.evaluate(model, "validation"), ev.evaluate(model, "test")
    assert rv.counts() == {"zoo_rot": 6, "zoo_sort": 6} and rt.counts() == {
        "zoo_rot": 9,
        "zoo_sort": 9,
    }
    full = ev.evaluate(model, "holdout")
    for task in ("zoo_rot", "zoo_sort"):  # the two parts' items are the holdout's items
        assert sorted(rv.values[task] + rt.values[task]) == sorted(full.values[task])
    # the digest a study keeps changes with what the scores depend on
    other = LMEvalEvaluator(
        parse_evaluate({**section, "holdout": {"limit": 15, "validation": 0.5}}, FILE, Path(".")),
        tok,
    )
    assert (
        other.digest()
        != ev.digest()
        == LMEvalEvaluator(parse_evaluate(section, FILE, Path(".")), tok).digest()
    )
    # share 0: every holdout item is a test item, no validation split
    none = LMEvalEvaluator(
        parse_evaluate({**section, "holdout": {"limit": 15, "validation": 0}}, FILE, Path(".")), tok
    )
    assert none.task_names("validation") == [] and none.texts("test") == hold
    with pytest.raises(EvomergeError, match="validation is 0"):
        none.evaluate(model, "validation")


@pytest.mark.parametrize("share", [1, -0.1, "half", True])
def test_a_validation_share_outside_0_1_is_refused(share):
    with pytest.raises(ConfigError) as e:
        parse_evaluate(
            {
                "tasks": ["zoo_rot"],
                "include_path": "zoo:micro",
                "holdout": {"tasks": ["zoo_rot_holdout"], "validation": share},
            },
            FILE,
            Path("."),
        )
    assert e.value.field == "evaluate.holdout.validation" and "[0, 1)" in str(e.value)


def test_too_few_holdout_items_to_split_is_an_error(micro_zoo, tok):
    cfg = parse_evaluate(
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "limit": 10, "holdout": {"limit": 1}},
        FILE,
        Path("."),
    )
    with pytest.raises(ConfigError) as e:
        LMEvalEvaluator(cfg, tok)
    assert e.value.field == "evaluate.holdout.validation" and "too few" in str(e.value)


def test_holdout_range_past_the_end_is_an_error(micro_zoo, tok):
    cfg = parse_evaluate(
        {"include_path": "zoo:micro", "tasks": ["zoo_rot"], "limit": 48, "holdout": {"limit": 10}},
        FILE,
        Path("."),
    )
    with pytest.raises(ConfigError) as e:
        LMEvalEvaluator(cfg, tok)
    assert e.value.field == "evaluate.holdout.limit" and "no docs" in str(e.value)


def test_holdout_tasks_score_separately(micro_zoo, tok):
    cfg = EvalConfig(
        search=[TaskSpec("zoo_rot")],
        holdout=[TaskSpec("zoo_rot_holdout")],
        include_path=[str(micro_zoo / "tasks")],
        limit=10,
        holdout_limit=12,
    )
    ev = LMEvalEvaluator(cfg, tok)
    r = ev.evaluate(_model(micro_zoo, "rot"), "holdout")
    assert list(r.scores) == ["zoo_rot_holdout"] and r.counts() == {"zoo_rot_holdout": 12}
    assert ev.texts("holdout")["zoo_rot_holdout"][0] == "{} {}".format(
        *(lambda it: (it.prompt, it.answer))(_items(micro_zoo, "zoo_rot_holdout")[0])
    )


def test_fake_evaluator_is_a_known_function_of_the_weights(micro_zoo):
    model = _model(micro_zoo, "base")
    stats = layer_stats(model)
    assert stats.shape == (2,)
    by_hand = float(
        sum(p.detach().double().sum() for n, p in model.named_parameters() if ".layers.0." in n)
        / sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n)
    )
    assert float(stats[0]) == pytest.approx(by_hand)
    ev = FakeEvaluator.layer_targets(
        {"a": stats.tolist(), "b": (stats + 0.01).tolist()}, width=1e-3, holdout_shift=0.01
    )
    r = ev.evaluate(model)
    assert r.scores["a"] == pytest.approx(1.0) and r.scores["b"] == pytest.approx(
        math.exp(-2 * 0.01**2 / 1e-3)
    )
    assert r.aggregate == pytest.approx((r.scores["a"] + r.scores["b"]) / 2)
    h = ev.evaluate(model, "holdout")
    assert h.scores["a_holdout"] == pytest.approx(math.exp(-2 * 0.01**2 / 1e-3)) and h.scores[
        "b_holdout"
    ] == pytest.approx(math.exp(-2 * 0.02**2 / 1e-3))

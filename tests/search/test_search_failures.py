"""One failing candidate never ends a study: whatever a merge or an evaluation raises fails that
trial only, with the exception's type and message in the table's ``error`` column."""

from __future__ import annotations

import pytest
from _fake_eval import TaskVectorEvaluator
from _spaces import write_space

from evomerge.engine.kernels import methods as kernels
from evomerge.search.loop import run_search
from evomerge.search.table import load_trials

pytestmark = pytest.mark.slow


class Boom(Exception):
    """An exception type nothing in evomerge knows about."""


class RaisingEvaluator(TaskVectorEvaluator):
    """Raises a different, arbitrary exception type on every third search evaluation."""

    ERRORS = (
        Boom("the scorer broke"),
        ZeroDivisionError("float division by zero"),
        AttributeError("'NoneType' object has no attribute 'logits'"),
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.search_calls = 0

    def evaluate(self, model, split="search"):
        if split == "search":
            self.search_calls += 1
            if self.search_calls % 3 == 0:
                raise self.ERRORS[(self.search_calls // 3 - 1) % len(self.ERRORS)]
        return super().evaluate(model, split)


def test_any_evaluator_exception_fails_one_trial_and_the_study_goes_on(tmp_path, tiny_family):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts, trials=6, finalists=2)
    out = run_search(
        space,
        evaluator=RaisingEvaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    assert out.n_complete == 6 and (searched["state"] == "COMPLETE").sum() == 6
    errors = set(searched.loc[searched["state"] == "FAIL", "error"])
    assert {"Boom: the scorer broke", "ZeroDivisionError: float division by zero"} <= errors | set(
        df["error"]
    )
    assert not (df["state"] == "RUNNING").any()


def test_a_merge_kernel_that_raises_fails_its_trials_only(tmp_path, tiny_family, monkeypatch):
    base, fts = tiny_family

    def broken(inp):
        raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'")

    # ties is broken; task_arithmetic and dare_ties still merge
    monkeypatch.setitem(kernels.KERNELS, "ties", broken)
    space = write_space(tmp_path / "space.yml", base, fts, trials=8, finalists=0, sampler="random")
    out = run_search(
        space,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    failed = searched[searched["state"] == "FAIL"]
    assert out.n_complete == 8
    assert len(failed) >= 1 and (failed["p_method"] == "ties").all()
    assert (
        failed["error"] == "TypeError: unsupported operand type(s) for +: 'Tensor' and 'NoneType'"
    ).all()
    assert (searched.loc[searched["p_method"] == "ties", "state"] == "FAIL").all()


@pytest.mark.parametrize("weights", [(1.0, -1.0), (0.0, 0.0)])
def test_a_zero_weight_sum_point_does_not_end_the_search(tmp_path, tiny_family, weights):
    """A linear point whose weights sum to zero (a step grid reaches it) is a failed trial or a
    scored one, as `evomerge merge` defines it; never the end of the study."""
    import yaml

    base, fts = tiny_family
    space = {
        "merge_method": "linear",
        "models": [
            {"model": str(f), "parameters": {"weight": {"choice": [w]}}}
            for f, w in zip(fts[:2], weights, strict=False)
        ],
        "dtype": "float32",
        "search": {"trials": 2, "finalists": 0, "sampler": "random"},
    }
    path = tmp_path / "zero.yml"
    path.write_text(yaml.safe_dump(space))
    out = run_search(
        path,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(out.paths.csv)
    searched = df[df["baseline"] == ""]
    assert len(searched) >= 2 and not (searched["state"] == "RUNNING").any()
    assert ((searched["state"] == "COMPLETE") | (searched["error"] != "")).all()


def test_identical_tensors_are_scored_once(tmp_path, tiny_family):
    """Normalized linear weights 1, 2 and 4 on one model give the same tensors (w·x / w is exact
    for powers of two): the second and later such trials take the first one's scores."""
    import yaml

    base, fts = tiny_family
    space = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(fts[0]), "parameters": {"weight": {"choice": [1.0, 2.0, 4.0]}}}],
        "search": {"trials": 4, "finalists": 0, "sampler": "random", "seed": 0},
    }
    path = tmp_path / "same.yml"
    path.write_text(yaml.safe_dump(space))
    ev = TaskVectorEvaluator(base, fts)
    out = run_search(path, evaluator=ev, results_dir=tmp_path / "r", quiet=True, log=lambda m: None)
    df = load_trials(out.paths.csv)
    searched = df[(df["baseline"] == "") & (df["state"] == "COMPLETE")]
    assert len(searched) == 4 and searched["digest"].nunique() == 1
    first = int(searched["number"].min())
    reused = searched[searched["number"] != first]
    assert (reused["reused_from"] == first).all() and (reused["eval_s"] == 0).all()
    assert (searched["score"] == searched["score"].iloc[0]).all()
    # evaluations: each baseline on search, validation and test, then the first trial on search,
    # (a new best) validation and (the chosen trial) test; without sharing, the three later
    # trials would add three more
    assert ev.calls == 3 * len(df[df["baseline"] != ""]) + 3


def test_a_model_without_tokenizer_files_is_one_line_before_any_output(
    tmp_path, tiny_family, capsys
):
    """The tiny models have no tokenizer (a checkpoint saved without one, as a LLaVA built in code):
    the search says so in one line, exit 2, and creates no study folder (was a transformers traceback)."""
    from evomerge.cli import main
    from evomerge.io import dump_yaml

    base, ft = tiny_family
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "one.jsonl").write_text(
        '{"prompt": "a", "choices": ["b", "c"], "label": 0}\n'
    )
    (tmp_path / "tasks" / "one_task.yaml").write_text(
        dump_yaml(
            {
                "task": "one_task",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tmp_path / "tasks" / "one.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{prompt}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "label",
            }
        )
    )
    space = tmp_path / "space.yml"
    space.write_text(
        dump_yaml(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(m), "parameters": {"weight": {"range": [0.1, 1.0]}}}
                    for m in ft[:2]
                ],
                "evaluate": {"include_path": str(tmp_path / "tasks"), "tasks": ["one_task"]},
                "study": {"name": "notok"},
            }
        )
    )
    code = main(
        [
            "search",
            str(space),
            "--trials",
            "1",
            "--results-dir",
            str(tmp_path / "results"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (
        err.startswith(f"evomerge: error: {space}: cannot load the tokenizer of {ft[0]}")
        and "tokenizer_source" in err
    )
    assert not (tmp_path / "results" / "notok").exists()

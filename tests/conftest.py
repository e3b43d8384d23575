"""Shared fixtures: tiny models built from a transformers config in temp dirs (no network)."""

from __future__ import annotations

import inspect
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from _tiny import make_tiny, perturbed  # noqa: E402,F401
from _zoo_fixture import micro_zoo  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny Llama base and three perturbed fine-tunes of it (float32), built once per run."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny(root / "base", seed=0)
    models = [perturbed(base, root / f"ft{i}", seed=i + 1, scale=0.05) for i in range(3)]
    return base, models


# ``-m "not slow"`` (the fast subset) leaves out every test that builds the micro zoo, runs a search,
# calls mergekit or otherwise takes seconds. Zoo users are found by fixture (``item.fixturenames`` is
# the transitive closure), searches by the test's own code: it calls ``run_search`` or starts
# test_search's runner script. test_mergekit_compat.py marks itself; the rest are named below.
_RUNS_A_SEARCH = re.compile(r"\brun_search\(|\bRUNNER\b|\b_runner\(")
_ALSO_SLOW = {  # file: test or fixture names
    "test_flags.py": {
        "test_study_flag_with_real_lm_eval_configs"
    },  # indexes all of lm-eval's tasks (~7 s)
    "test_probe.py": {"family"},  # fine-tunes two models for the probe (~5 s)
    "test_generate.py": {"gsm8k"},  # trains a 32k BPE tokenizer (~10 s)
    "test_zoo_gen.py": {
        "test_shared_scorer_generates_hflms_answers_on_the_zoo"
    },  # four lm-eval runs per case
    "test_search_failures.py": {
        "test_a_model_without_tokenizer_files_is_one_line_before_any_output"
    },  # builds lm-eval's task index (~7 s)
}


def _runs_a_search(item: pytest.Item) -> bool:
    fn = getattr(item, "function", None)
    if fn is None:
        return False
    try:
        return bool(_RUNS_A_SEARCH.search(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        named = _ALSO_SLOW.get(item.path.name, set())
        if (
            "micro_zoo" in fixtures
            or _runs_a_search(item)
            or named & (fixtures | {getattr(item, "originalname", item.name)})
        ):
            item.add_marker(pytest.mark.slow)

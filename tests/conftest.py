"""Shared fixtures: tiny models built from a transformers config in temp dirs (no network)."""

from __future__ import annotations

import os

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


# Slowness is marked where a test is written (``pytestmark = pytest.mark.slow`` for a module,
# ``@pytest.mark.slow`` for a test): whatever builds the micro zoo, runs a search, compiles kernels,
# calls mergekit or otherwise takes seconds. Doctests cannot carry a mark; the slow ones are named.
_SLOW_DOCTESTS = {
    "evomerge.evaluation.tasks.task_configs",  # indexes every task lm-eval ships
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.name in _SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)

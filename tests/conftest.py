"""Shared fixtures: tiny models built from a transformers config in temp dirs (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _tiny import make_tiny, perturbed  # noqa: E402,F401
from _zoo_fixture import micro_zoo  # noqa: E402,F401

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny Llama base and three perturbed fine-tunes of it (float32), built once per run."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny(root / "base", seed=0)
    models = [perturbed(base, root / f"ft{i}", seed=i + 1, scale=0.05) for i in range(3)]
    return base, models

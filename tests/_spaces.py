"""Search-space files the tests write: over the tiny family (a tiny base and its fine-tunes) and over
the micro zoo with real lm-eval tasks."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.zoo import SKILLS

__all__ = ["write_space", "dare_space", "zoo_space"]


def write_space(path: Path, base: Path, fts: list[Path], **search) -> Path:
    space = {
        "merge_method": {"choice": ["task_arithmetic", "ties", "dare_ties"]},
        "base_model": str(base),
        "models": [
            {
                "model": str(f),
                "parameters": {"weight": {"range": [0.0, 1.5]}, "density": {"range": [0.3, 1.0]}},
            }
            for f in fts
        ],
        "parameters": {"lambda": {"range": [0.5, 1.5]}},
        "dtype": "float32",
        "search": {"trials": 8, "seed": 1, "finalists": 3, **search},
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def dare_space(path: Path, base: Path, fts: list[Path], trials: int) -> Path:
    """dare_ties over the first two fine-tunes, density searched: every trial draws random masks
    (seed 3, random sampler)."""
    space = {
        "merge_method": "dare_ties",
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(f), "parameters": {"weight": 0.5, "density": {"range": [0.3, 0.7]}}}
            for f in fts[:2]
        ],
        "search": {"trials": trials, "seed": 3, "finalists": 1, "sampler": "random"},
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def zoo_space(path, *, tasks, holdout, trials=5, name="zoo", **search):
    space = {
        "merge_method": "task_arithmetic",
        "base_model": "zoo:micro/base",
        "models": [
            {"model": f"zoo:micro/{s}", "parameters": {"weight": {"range": [0.0, 1.5]}}}
            for s in SKILLS
        ],
        "parameters": {"lambda": {"range": [0.5, 1.5]}},
        "dtype": "float32",
        "evaluate": {
            "include_path": "zoo:micro",
            "tasks": tasks,
            "holdout": {"tasks": holdout},
            "batch_size": 64,
        },
        "search": {"trials": trials, "seed": 0, "finalists": 2, **search},
        "study": {"name": name},
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path

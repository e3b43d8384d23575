"""Preparing a search: everything checked and opened before the first trial, nothing written yet.

:func:`prepare` loads the space, opens the sources, builds the evaluator, checks the objectives
and opens the storage, in that order: a bad space, a missing or unreadable model, an unknown task
or a bad storage URL is reported before anything is written. The contamination assessment
(:meth:`Setup.assess`) runs once per study, by the worker that sets the study up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from evomerge.contamination.rules import Assessment, assess
from evomerge.dataflow.candidate import METHOD
from evomerge.dataflow.slots import check_section
from evomerge.engine.merger import Merger, check_device
from evomerge.engine.sources import ModelSource, open_sources
from evomerge.errors import ConfigError, EvomergeError, one_line
from evomerge.evaluation.base import Evaluator
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.evaluation.section import parse_evaluate
from evomerge.recipe.schema import parse_recipe
from evomerge.search.baselines import baseline_recipes
from evomerge.search.inputs import sources_digest
from evomerge.search.liveness import Liveness
from evomerge.search.recovery import on_stale
from evomerge.search.storage import StudyPaths, open_storage, study_paths
from evomerge.search.study_source import resolve_study_sources
from evomerge.space import Space, load_space
from evomerge.space.moe import check_prompt_tasks

__all__ = ["Setup", "prepare"]

# Below this many parameters per model, CPU merges and forward passes run on one thread: their
# matrices are too small for intra-op threads to pay, and on a busy machine two threads were
# measured 4-50x slower than one (the demo zoo's models have 0.9M).
SMALL_MODEL = 50_000_000


@dataclass
class Setup:
    """A prepared search (see :func:`prepare`)."""

    space: Space
    file: str
    trials: int
    seed: int
    device: str
    paths: StudyPaths
    sources: dict[str, ModelSource]
    merger: Merger
    evaluator: Evaluator
    tokenizer_dir: Path
    baselines: dict[str, dict[str, Any]]
    search_tasks: list[str]
    holdout_tasks: list[str]
    splits: tuple[str, ...]  # the holdout's splits: validation (unless its share is 0) and test
    objectives: list[str]
    storage: Any
    log: Callable[[str], None]
    liveness: Liveness
    assessment: Assessment | None = None  # set by :meth:`assess` or read from the study

    def assess(self) -> Assessment | None:
        """The contamination assessment of the space's sources and tasks (None when the checks
        themselves failed: flags are evidence, never a reason to refuse a search)."""
        return _assess(self.space, self.evaluator, self.search_tasks, self.holdout_tasks, self.log)

    @cached_property
    def inputs(self) -> dict[str, str]:
        """Digests of what every score depends on (:mod:`evomerge.search.inputs`)."""
        return {"evaluation": self.evaluator.digest(), "sources": sources_digest(self.sources)}

    @property
    def mask_seed(self) -> int:
        """The seed of random masks (``search.mask_seed``, else the search seed)."""
        return self.seed if self.space.search.mask_seed is None else self.space.search.mask_seed

    def layers_of(self, ref: str) -> int:
        """Decoder layers of a model (opening it when the space did not name it up front)."""
        if ref not in self.sources:
            self.sources.update(open_sources([ref], file=self.file))
        return self.sources[ref].arch.num_layers


def _parameters(source: ModelSource) -> int:
    total = 0
    for name in source.names():
        n = 1
        for s in source.shape(name):
            n *= s
        total += n
    return total


def _threads(device: str, sources: dict[str, ModelSource]) -> int | None:
    if not device.startswith("cpu") or not sources:
        return None
    return 1 if max(_parameters(s) for s in sources.values()) < SMALL_MODEL else None


def _tokenizer_dir(space: Space, sources: dict[str, ModelSource], file: str) -> Path:
    ref = (
        space.tree.get("tokenizer_source")
        if isinstance(space.tree.get("tokenizer_source"), str)
        else None
    )
    if ref in (None, "base"):
        ref = space.model_refs()[0]
    return sources[ref].path if ref in sources else open_sources([ref], file=file)[ref].path


def _assess(
    space: Space,
    evaluator: Evaluator,
    search_tasks: list[str],
    holdout_tasks: list[str],
    log: Callable[[str], None],
) -> Assessment | None:
    include = getattr(getattr(evaluator, "cfg", None), "include_path", None)
    # Reuse the evaluator's lm-eval task index (building one reads ~15k YAML files); an
    # evaluator without lm-eval tasks (tests, custom scorers) has no datasets to look up.
    tm = getattr(evaluator, "task_manager", None)
    if tm is None and include is None:
        tm = SimpleNamespace(task_index={})
    try:
        return assess(
            space.model_refs(), search_tasks, holdout_tasks, include_path=include, task_manager=tm
        )
    except EvomergeError:
        raise
    except Exception as e:  # flags are evidence, never a reason to refuse a search
        log(f"warning: contamination checks failed: {one_line(e)}")
        return None


def _study_folder(folder: Path) -> None:
    """Create the study's folder; one line when it cannot be made or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvomergeError(
            f"cannot create the study's folder {folder}: {one_line(e.strerror or e)}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvomergeError(
            f"{folder}: the study's folder is not writable (its results table goes there)"
        )


def prepare(
    space_file: str | Path,
    *,
    trials: int | None = None,
    device: str | None = None,
    storage: str | None = None,
    study: str | None = None,
    seed: int | None = None,
    results_dir: str | Path = "results",
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
    liveness: Liveness | None = None,
) -> Setup:
    """Check and open everything a search needs.

    Args:
        space_file: the search space YAML.
        trials, device, storage, study, seed, results_dir: overrides of the space's settings.
        evaluator: an :class:`~evomerge.evaluation.base.Evaluator` instead of lm-eval (tests).
        log: where progress lines go (default: stdout).
        threads: CPU threads for torch (default: 1 for models under 50M parameters, else torch's).
        liveness: heartbeat interval, grace period and polling of the study's workers (default:
            :class:`~evomerge.search.recovery.Liveness` ()).

    Raises:
        ConfigError / EvomergeError: anything wrong with the space, its models, its tasks or the
            storage (checked before anything is written).
    """
    log = log or (lambda msg: print(msg, flush=True))
    space = load_space(space_file)
    file = str(space_file)
    s = space.search
    if trials is not None and trials <= 0:
        raise EvomergeError(f"--trials: must be a positive integer, got {trials}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    paths = study_paths(
        space_file,
        study=study,
        space_study=space.study_name,
        storage=storage,
        space_storage=space.storage,
        results_dir=results_dir,
    )
    dataflow = space.tree.get("dataflow")
    if dataflow is not None:  # PS+DFS: a finished study's trial is a source
        resolve_study_sources(space, results_dir=results_dir, log=log)
    # Models: open once; a space whose models cannot merge fails here, before any output.
    sources = open_sources(space.model_refs(), file=file)
    if dataflow is not None:
        check_section(dataflow, file, sources, lambda ref: sources[ref].arch.num_layers)
    threads = threads if threads is not None else _threads(device, sources)
    if threads:
        torch.set_num_threads(threads)
    seed = s.seed if seed is None else seed
    merger = Merger(
        sources, device=device, seed=seed if s.mask_seed is None else s.mask_seed, resident=True
    )
    if merger.placement is not None and merger.device.type == "cuda":
        log(merger.placement.describe())
    tokenizer_dir = _tokenizer_dir(space, sources, file)
    baselines = baseline_recipes(space)
    for name, recipe in baselines.items():
        if (
            (name == "uniform" or name.startswith("hand:"))
            and recipe.get("merge_method") not in ("moe", METHOD)
            and "experts" not in recipe
        ):
            merger.plan(parse_recipe(recipe, f"{file} (baseline {name})"))
    # Evaluation: tasks, prompts and datasets built once for the whole study.
    if evaluator is None:
        from transformers import AutoTokenizer

        cfg = parse_evaluate(space.evaluate, file, space.base_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (
            Exception
        ) as e:  # no tokenizer files (a checkpoint saved without them), an unreadable one
            raise EvomergeError(
                f"{file}: cannot load the tokenizer of {tokenizer_dir} to score candidates ({one_line(e)[:160]}); "
                "add its tokenizer files or name a model that has them in tokenizer_source"
            ) from None
        evaluator = LMEvalEvaluator(cfg, tokenizer, device=device)
    search_tasks = list(evaluator.task_names("search"))
    if "moe" in space.tree:
        space.prompt_texts = evaluator.prompts("search")  # routing prompts drawn from search items
        check_prompt_tasks(file, space.tree, space.prompt_texts)
    holdout_tasks = list(evaluator.task_names("holdout"))
    splits = tuple(split for split in ("validation", "test") if evaluator.task_names(split))
    objectives = list(s.objectives)
    if objectives == ["tasks"]:
        objectives = search_tasks
    for o in objectives:
        if o not in search_tasks:
            raise ConfigError(
                file,
                "search.objectives",
                f"{o!r} is not a search task (tasks: {', '.join(search_tasks)})",
            )
    # Storage last: a bad URL is reported before anything is written; the folder is created
    # only now that every check has passed.
    if paths.default_storage:
        _study_folder(paths.folder)
    liveness = liveness or Liveness()
    opened = open_storage(
        paths.storage,
        field="--storage" if storage else "study.storage",
        liveness=liveness,
        on_stale=on_stale,
    )
    _study_folder(paths.folder)
    return Setup(
        space,
        file,
        trials or s.trials,
        seed,
        device,
        paths,
        sources,
        merger,
        evaluator,
        tokenizer_dir,
        baselines,
        search_tasks,
        holdout_tasks,
        splits,
        objectives,
        opened,
        log,
        liveness,
    )

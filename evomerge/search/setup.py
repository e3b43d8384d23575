"""Preparing a search: everything checked and opened before the first trial, nothing written yet.

:func:`prepare` loads the space, opens the sources, builds the evaluator, checks the objectives
and opens the storage, in that order: a bad space, a missing or unreadable model, an unknown task
or a bad storage URL is reported before anything is written. The contamination assessment
(:meth:`Setup.assess`) runs once per study, by the worker that sets the study up.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from evomerge.contamination.rules import (
    Assessment,
    assess,
    assessment_from_dict,
    assessment_to_dict,
)
from evomerge.dataflow.candidate import METHOD
from evomerge.dataflow.slots import check_section
from evomerge.engine.merger import Merger, check_device
from evomerge.engine.placement import budget_override
from evomerge.engine.plan import make_plan
from evomerge.engine.sources import ModelSource, open_missing, open_sources
from evomerge.errors import ConfigError, EvomergeError, one_line
from evomerge.evaluation.base import Evaluator
from evomerge.evaluation.genlm import context_length
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.evaluation.section import check_tasks_of
from evomerge.recipe.schema import parse_recipe
from evomerge.search.baselines import baseline_recipes, enqueue_first_trials
from evomerge.search.distributed.liveness import Liveness
from evomerge.search.distributed.recovery import on_stale
from evomerge.search.inputs import check_inputs, check_table, sources_digest
from evomerge.search.records import StudyMeta, StudyRecords, study_stream
from evomerge.search.storage import StudyPaths, open_storage, study_paths
from evomerge.search.study_source import resolve_study_sources
from evomerge.space import Directive, Space, load_space
from evomerge.space.moe import check_prompt_tasks
from evomerge.space.validate import check_layer_groups

__all__ = ["Setup", "prepare"]

# Below this many parameters per model, CPU merges and forward passes run on one thread: their
# matrices are too small for intra-op threads to pay (the demo zoo's models have 0.9M).
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
    prompts: Mapping[str, list[str]] | None  # search items' prompts (mixtures' routing prompts)
    objectives: list[str]
    storage: Any
    log: Callable[[str], None]
    liveness: Liveness
    layers_of: Callable[[str], int]  # decoder layers of a model of the space (KeyError: another)
    mask_seed: int  # the seed of random masks (``search.mask_seed``, else the search seed)
    assessment: Assessment | None = None  # set by :meth:`assess` or read from the study

    def assess(self) -> Assessment | None:
        """The contamination assessment of the space's sources and tasks (None when the checks
        themselves failed: flags are evidence, never a reason to refuse a search)."""
        include = self.evaluator.include_path() or None
        # Reuse the evaluator's lm-eval task index (building one reads ~15k YAML files); an
        # evaluator without lm-eval tasks (tests, custom scorers) has no datasets to look up.
        tm = self.evaluator.tasks_index()
        if tm is None and include is None:
            tm = SimpleNamespace(task_index={})
        try:
            return assess(
                self.space.model_refs(),
                self.search_tasks,
                self.holdout_tasks,
                include_path=include,
                task_manager=tm,
            )
        except EvomergeError:
            raise
        except Exception as e:  # flags are evidence, never a reason to refuse a search
            self.log(f"warning: contamination checks failed: {one_line(e)}")
            return None

    @cached_property
    def inputs(self) -> dict[str, str]:
        """Digests of what every score depends on (:mod:`evomerge.search.inputs`)."""
        return {"evaluation": self.evaluator.digest(), "sources": sources_digest(self.sources)}

    def check(self, records: StudyRecords) -> None:
        """Refuse a study that cannot go on as it is, before anything is written: a results table
        the storage cannot account for, inputs changed since it started
        (:mod:`evomerge.search.inputs`). A study set up before inputs were kept records them now.

        Raises:
            EvomergeError: one line saying which, and what to do.
        """
        check_table(records.study, self.paths.csv)
        stored = records.meta().inputs
        check_inputs(stored, self.inputs, file=self.file, study=self.paths.name)
        if stored is None and records.meta().space is not None:
            records.set_inputs(self.inputs)

    @cached_property
    def fingerprint(self) -> str:
        """What the study is set up for: the space's tree, the objectives, the hand recipes (a
        hand recipe's file may change alone)."""
        hand = {k: v for k, v in self.baselines.items() if k.startswith("hand:")}
        return json.dumps(
            {"tree": _jsonable(self.space.tree), "objectives": self.objectives}
            | ({"hand": hand} if hand else {}),
            sort_keys=True,
            default=str,
        )

    @property
    def setup_digest(self) -> str:
        return hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]

    def set_up_study(self, records: StudyRecords) -> None:
        """Once per study (and again when the space changed): assess contamination, record what
        readers need, queue the sources' own paths (a data-flow space) and the hand recipes that
        are points of the space."""
        s = self
        old = records.refresh().meta().space
        if old is not None and old != s.fingerprint:
            s.log(
                f"warning: the space changed since study {s.paths.name!r} started; earlier trials keep their recipes (use --study NEW to start afresh)"
            )
        s.assessment = s.assess()
        records.set_meta(
            StudyMeta(
                space=s.fingerprint,
                space_file=str(Path(s.file).resolve()),
                seed=s.mask_seed,
                model_refs=s.space.model_refs(),
                include_path=s.evaluator.include_path() or None,
                search_tasks=s.search_tasks,
                holdout_tasks=s.holdout_tasks,
                flags=s.assessment.columns() if s.assessment is not None else {},
                assessment=assessment_to_dict(s.assessment) if s.assessment is not None else None,
                stream=s.merger.stream,  # a resumed study's own (records.study_stream)
                selection="validation" if "validation" in s.splits else "search",
                inputs=s.inputs,
            )
        )
        enqueue_first_trials(s.space, s.baselines, records, layers_of=s.layers_of, log=s.log)
        records.set_setup(self.setup_digest)

    def warn_flags(self, records: StudyRecords) -> None:
        """Log the contamination warnings (the study's, when another worker set it up)."""
        s = self
        if s.assessment is None:  # another worker set the study up: its assessment is in the study
            stored = records.refresh().meta().assessment
            s.assessment = assessment_from_dict(stored) if stored else None
        for w in s.assessment.warnings() if s.assessment is not None else ():
            s.log(w)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Directive):  # every field but where it is written; its kind as "directive"
        fields = {k: v for k, v in asdict(x).items() if k not in ("kind", "path")}
        return {"directive": x.kind, **fields, "choices": list(x.choices)}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _threads(device: str, sources: dict[str, ModelSource]) -> int | None:
    if not device.startswith("cpu") or not sources:
        return None
    largest = max(sum(math.prod(s.shape(n)) for n in s.names()) for s in sources.values())
    return 1 if largest < SMALL_MODEL else None


def _context(space: Space, sources: dict[str, ModelSource], tokenizer: Any) -> int:
    """The candidates' context length as HFLM reads it: the base model's config where the space
    has one, else the shortest of the sources'."""
    base = space.tree.get("base_model")
    chosen = [sources[base]] if isinstance(base, str) and base in sources else sources.values()
    return min(context_length(s.config, tokenizer) for s in chosen)


def _tokenizer_dir(space: Space, sources: dict[str, ModelSource], file: str) -> Path:
    ref = space.tree.get("tokenizer_source")
    if not isinstance(ref, str) or ref == "base":
        ref = space.model_refs()[0]
    return sources[ref].path if ref in sources else open_sources([ref], file=file)[ref].path


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
            :class:`~evomerge.search.distributed.liveness.Liveness` ()).

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
    if "dataflow" in space.tree:  # PS+DFS: a finished study's trial is a source
        space = resolve_study_sources(space, results_dir=results_dir, log=log)
    # Models: open once; a space whose models cannot merge fails here, before any output.
    sources = open_sources(space.model_refs(), file=file)

    def layers_of(ref: str) -> int:
        return sources[ref].arch.num_layers

    check_layer_groups(space, layers_of)
    if "dataflow" in space.tree:  # checked against the models; caps read off them
        section = check_section(space.tree["dataflow"], file, sources, layers_of)
        space = replace(space, tree={**space.tree, "dataflow": section})
    threads = threads if threads is not None else _threads(device, sources)
    if threads:
        torch.set_num_threads(threads)
    seed = s.seed if seed is None else seed
    mask_seed = seed if s.mask_seed is None else s.mask_seed
    placed = dict(sources)  # what the merger places; hand recipes' other models are read as needed
    gpu_memory = budget_override()  # a bad $EVOMERGE_GPU_MEMORY is refused before any write
    tokenizer_dir = _tokenizer_dir(space, sources, file)
    baselines = baseline_recipes(space, layers_of)
    for name, recipe in baselines.items():
        if (
            (name == "uniform" or name.startswith("hand:"))
            and recipe.get("merge_method") not in ("moe", METHOD)
            and "experts" not in recipe
        ):
            cfg = parse_recipe(recipe, f"{file} (baseline {name})")
            open_missing(sources, cfg.referenced_models(), file=cfg.source_file)
            make_plan(cfg, sources)
    # Evaluation: tasks, prompts and datasets built once for the whole study.
    if evaluator is None:
        from transformers import AutoTokenizer

        if space.evaluation is None:
            raise ConfigError(
                file, "evaluate", "missing: name the tasks (or a preset) that score a candidate"
            )
        check_tasks_of(space.evaluation)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        # no tokenizer files (a checkpoint saved without them), an unreadable one
        except Exception as e:
            raise EvomergeError(
                f"{file}: cannot load the tokenizer of {tokenizer_dir} to score candidates ({one_line(e)[:160]}); "
                "add its tokenizer files or name a model that has them in tokenizer_source"
            ) from None
        evaluator = LMEvalEvaluator(
            space.evaluation,
            tokenizer,
            device=device,
            max_length=_context(space, sources, tokenizer),
        )
    search_tasks = list(evaluator.task_names("search"))
    prompts = None
    if "moe" in space.tree:  # routing prompts drawn from search items
        prompts = evaluator.prompts("search")
        check_prompt_tasks(file, space.tree, prompts)
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
    merger = Merger(
        placed,
        device=device,
        seed=mask_seed,
        resident=True,
        stream=study_stream(opened, paths.name),
        gpu_memory=gpu_memory,
    )
    if merger.placement is not None and merger.device.type == "cuda":
        log(merger.placement.describe())
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
        prompts,
        objectives,
        opened,
        log,
        liveness,
        layers_of,
        mask_seed,
    )

"""Scoring candidates: the ``evaluate:`` section of a search space and the lm-eval adapter.

:func:`parse_evaluate` turns the YAML section into an :class:`EvalConfig` (checking task names, the
include path and search/holdout disjointness without downloading anything).
:class:`LMEvalEvaluator` builds lm-eval's task objects once and scores any in-memory model with
them; :class:`FakeEvaluator` scores a model from its tensors alone, for fast search tests.
"""

from __future__ import annotations

import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, did_you_mean

__all__ = [
    "TaskSpec",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "LMEvalEvaluator",
    "FakeEvaluator",
    "PRESETS",
    "parse_evaluate",
    "task_manager",
]

# Public benchmark bundles. Names were checked against lm-eval 0.4.13's TaskManager.
PRESETS: dict[str, tuple[tuple[str, str, int], ...]] = {
    # The Open LLM Leaderboard (v1) settings.
    "open_llm_v1": (
        ("arc_challenge", "acc_norm", 25),
        ("hellaswag", "acc_norm", 10),
        ("mmlu", "acc", 5),
        ("truthfulqa_mc2", "acc", 0),
        ("winogrande", "acc", 5),
        ("gsm8k", "exact_match", 5),
    ),
    # The Nous suite used on merge leaderboards: AGIEval (English), the GPT4All set, TruthfulQA and
    # the BIG-bench tasks of that suite (multiple-choice variants), all zero-shot.
    "nous": (
        ("agieval_nous", "acc_norm", 0),
        ("hellaswag", "acc_norm", 0),
        ("openbookqa", "acc_norm", 0),
        ("winogrande", "acc", 0),
        ("arc_easy", "acc", 0),
        ("arc_challenge", "acc_norm", 0),
        ("boolq", "acc", 0),
        ("piqa", "acc_norm", 0),
        ("truthfulqa_mc2", "acc", 0),
    )
    + tuple(
        (f"bigbench_{t}_multiple_choice", "acc", 0)
        for t in (
            "causal_judgment",
            "date_understanding",
            "disambiguation_qa",
            "geometric_shapes",
            "logical_deduction",
            "movie_recommendation",
            "navigate",
            "reasoning_about_colored_objects",
            "ruin_names",
            "salient_translation_error_detection",
            "snarks",
            "sports_understanding",
            "temporal_sequences",
            "tracking_shuffled_objects",
        )
    ),
}

_KEYS = {"include_path", "tasks", "preset", "limit", "holdout", "batch_size"}
_TASK_KEYS = {"name", "metric", "weight", "num_fewshot"}
_HOLDOUT_KEYS = {"tasks", "limit"}


@dataclass(frozen=True)
class TaskSpec:
    """One scored task: its lm-eval name, the metric read from its results, weight and shots."""

    name: str
    metric: str = "acc"
    weight: float = 1.0
    num_fewshot: int | None = None


@dataclass
class EvalConfig:
    """The parsed ``evaluate:`` section.

    ``limit`` takes the first ``limit`` docs of each search task (None: all). ``holdout_limit`` with
    an empty ``holdout`` list means: the holdout items are docs ``[limit, limit + holdout_limit)`` of
    the search tasks themselves; with holdout tasks it takes their first ``holdout_limit`` docs.
    ``file`` is the space file, named in errors found later (a holdout range past the end).
    """

    search: list[TaskSpec]
    holdout: list[TaskSpec] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    limit: int | None = None
    holdout_limit: int | None = None
    batch_size: int = 32
    preset: str | None = None
    file: str = ""

    @property
    def holdout_same_tasks(self) -> bool:
        """True when the holdout is a later doc range of the search tasks."""
        return not self.holdout and self.holdout_limit is not None

    def has_holdout(self) -> bool:
        return bool(self.holdout) or self.holdout_limit is not None


@dataclass
class EvalResult:
    """Scores of one model: per task, their standard errors and the weighted aggregate."""

    scores: dict[str, float]
    stderr: dict[str, float]
    aggregate: float
    aggregate_se: float
    seconds: float
    n_items: dict[str, int]


def _aggregate(specs: Iterable[TaskSpec], scores: Mapping[str, float], stderr: Mapping[str, float]) -> tuple[float, float]:
    specs = list(specs)
    wsum = sum(s.weight for s in specs)
    agg = sum(s.weight * scores[s.name] for s in specs) / wsum
    se = math.sqrt(sum((s.weight * stderr.get(s.name, 0.0)) ** 2 for s in specs)) / wsum
    return agg, se


# ----------------------------------------------------------------------------------------- parsing


def _quiet_lm_eval() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # datasets' progress bars during loading
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - datasets is a dependency of lm-eval
        pass


@lru_cache(maxsize=8)
def task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """A cached lm-eval ``TaskManager`` (indexing lm-eval's own ~15k task files takes many seconds,
    so a config that only uses local tasks gets a manager without them).

    Args:
        include_path: local task directories.
        include_defaults: also index lm-eval's bundled tasks.

    Returns:
        The ``lm_eval.tasks.TaskManager``.
    """
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def _local_task_names(include_path: Iterable[str]) -> set[str]:
    tm = task_manager(tuple(include_path), False)
    return set(tm.all_tasks)


def _resolve_include(value: Any, file: str, base_dir: Path) -> list[str]:
    values = value if isinstance(value, list) else [value]
    out: list[str] = []
    for i, v in enumerate(values):
        where = "evaluate.include_path" + (f"[{i}]" if isinstance(value, list) else "")
        if not isinstance(v, str) or not v:
            raise ConfigError(file, where, f"must be a directory path or zoo:<size>, got {v!r}")
        if v.startswith("zoo:"):
            from evomerge.zoo import ZOO_SIZES, resolve_zoo_ref

            resolved = resolve_zoo_ref(v) if "/" not in v else None
            if resolved is None:
                raise ConfigError(file, where, f"unknown zoo {v!r}" + did_you_mean(v, [f"zoo:{s}" for s in ZOO_SIZES]))
            out.append(str(Path(resolved).resolve()))
            continue
        p = Path(v).expanduser()
        if not p.is_absolute():
            p = base_dir / p
        if not p.is_dir():
            raise ConfigError(file, where, f"directory {v!r} does not exist (looked at {p})")
        out.append(str(p.resolve()))
    return out


def _int_or_none(value: Any, file: str, where: str, *, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(file, where, f"must be an integer >= {minimum} or null, got {value!r}")
    return value


def _parse_task(entry: Any, file: str, where: str) -> TaskSpec:
    if isinstance(entry, str) and entry:
        return TaskSpec(entry)
    if not isinstance(entry, Mapping):
        raise ConfigError(file, where, f"must be a task name or a mapping with keys {sorted(_TASK_KEYS)}, got {entry!r}")
    unknown = set(entry) - _TASK_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(file, f"{where}.{key}", "unknown key" + did_you_mean(str(key), _TASK_KEYS))
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(file, f"{where}.name", "a task needs a name")
    metric = entry.get("metric", "acc")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(file, f"{where}.metric", f"must be a metric name such as acc or acc_norm, got {metric!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
        raise ConfigError(file, f"{where}.weight", f"must be a positive number, got {weight!r}")
    shots = _int_or_none(entry.get("num_fewshot"), file, f"{where}.num_fewshot", minimum=0)
    return TaskSpec(name, metric, float(weight), shots)


def _parse_task_list(value: Any, file: str, where: str) -> list[TaskSpec]:
    if not isinstance(value, list):
        raise ConfigError(file, where, f"must be a list of task names or mappings, got {type(value).__name__}")
    specs = [_parse_task(e, file, f"{where}[{i}]") for i, e in enumerate(value)]
    seen: set[str] = set()
    for i, s in enumerate(specs):
        if s.name in seen:
            raise ConfigError(file, f"{where}[{i}]", f"task {s.name!r} is listed twice")
        seen.add(s.name)
    return specs


def _check_names(specs: list[TaskSpec], where: str, file: str, include_path: list[str], *, skip: set[str]) -> None:
    """Every task name must exist, locally or in lm-eval's own index (names only: no download)."""
    local = _local_task_names(include_path) if include_path else set()
    missing = [(i, s) for i, s in enumerate(specs) if s.name not in local and s.name not in skip]
    if not missing:
        return
    known = set(task_manager(tuple(include_path), True).all_tasks)
    for i, s in missing:
        if s.name not in known:
            raise ConfigError(file, f"{where}[{i}]", f"unknown lm-eval task {s.name!r}" + did_you_mean(s.name, known, show_all=0))


def parse_evaluate(section: Mapping[str, Any] | None, file: str, base_dir: Path) -> EvalConfig:
    """Parse and validate the ``evaluate:`` section of a search space.

    Args:
        section: the mapping (None: the demo zoo's defaults are *not* implied; an error).
        file: the space file's name, for messages.
        base_dir: directory that relative include paths are resolved against.

    Returns:
        The :class:`EvalConfig`.

    Raises:
        ConfigError: unknown key or task, missing include path, bad limit/weight, holdout items that
            overlap search items.
    """
    if section is None:
        raise ConfigError(file, "evaluate", "missing: name the tasks (or a preset) that score a candidate")
    if not isinstance(section, Mapping):
        raise ConfigError(file, "evaluate", f"must be a mapping, got {type(section).__name__}")
    unknown = set(section) - _KEYS
    if unknown:
        key = sorted(map(str, unknown))[0]
        raise ConfigError(file, f"evaluate.{key}", "unknown key" + did_you_mean(key, _KEYS))
    include = _resolve_include(section["include_path"], file, Path(base_dir)) if section.get("include_path") is not None else []

    preset = section.get("preset")
    search: list[TaskSpec] = []
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(file, "evaluate.preset", f"unknown preset {preset!r}" + did_you_mean(str(preset), PRESETS))
        search = [TaskSpec(n, m, 1.0, k) for n, m, k in PRESETS[preset]]
    if section.get("tasks") is not None:
        extra = _parse_task_list(section["tasks"], file, "evaluate.tasks")
        names = {s.name for s in search}
        for i, s in enumerate(extra):
            if s.name in names:
                raise ConfigError(file, f"evaluate.tasks[{i}]", f"task {s.name!r} is already in preset {preset}")
        search += extra
    if not search:
        raise ConfigError(file, "evaluate.tasks", "name at least one task (or a preset: " + ", ".join(PRESETS) + ")")
    limit = _int_or_none(section.get("limit"), file, "evaluate.limit")
    batch_size = _int_or_none(section.get("batch_size", 32), file, "evaluate.batch_size")
    preset_names = {n for n, _, _ in PRESETS.get(preset or "", ())}
    _check_names(search, "evaluate.tasks", file, include, skip=preset_names)

    holdout: list[TaskSpec] = []
    holdout_limit: int | None = None
    h = section.get("holdout")
    if h is not None:
        if not isinstance(h, Mapping):
            raise ConfigError(file, "evaluate.holdout", "must be a mapping: {tasks: [...]} or {limit: N}")
        unknown = set(h) - _HOLDOUT_KEYS
        if unknown:
            key = sorted(map(str, unknown))[0]
            raise ConfigError(file, f"evaluate.holdout.{key}", "unknown key" + did_you_mean(key, _HOLDOUT_KEYS))
        holdout_limit = _int_or_none(h.get("limit"), file, "evaluate.holdout.limit")
        if h.get("tasks") is not None:
            holdout = _parse_task_list(h["tasks"], file, "evaluate.holdout.tasks")
            _check_names(holdout, "evaluate.holdout.tasks", file, include, skip=set())
        elif holdout_limit is None:
            raise ConfigError(file, "evaluate.holdout", "give tasks (separate holdout tasks) or limit (the docs after the search docs)")
        elif limit is None:
            raise ConfigError(file, "evaluate.holdout.limit", "the holdout docs follow the search docs, so evaluate.limit must be set (otherwise search uses every doc and they overlap)")
    cfg = EvalConfig(search, holdout, include, limit, holdout_limit, int(batch_size or 32), preset, file)
    _check_disjoint(cfg)
    return cfg


def _check_disjoint(cfg: EvalConfig) -> None:
    """Holdout tasks may not repeat search tasks, and local holdout tasks may not share items with
    local search tasks (compared by prompt + gold answer text; public tasks are never loaded here)."""
    search_names = {s.name for s in cfg.search}
    for i, s in enumerate(cfg.holdout):
        if s.name in search_names:
            raise ConfigError(cfg.file, f"evaluate.holdout.tasks[{i}]", f"{s.name!r} is also a search task: its holdout items would overlap the search items (use holdout: {{limit: N}} for a later doc range)")
    if not cfg.holdout or not cfg.include_path:
        return
    local = _local_task_names(cfg.include_path)
    s_local = [s.name for s in cfg.search if s.name in local]
    h_local = [(i, s.name) for i, s in enumerate(cfg.holdout) if s.name in local]
    if not s_local or not h_local:
        return
    tm = task_manager(tuple(cfg.include_path), False)
    tasks = _leaf_tasks(_get_task_dict(s_local + [n for _, n in h_local], tm))
    search_texts: dict[str, str] = {}
    for name in s_local:
        for t in _texts_of(tasks, name, _doc_ids(tasks, name, 0, cfg.limit)):
            search_texts.setdefault(t, name)
    for i, name in h_local:
        for t in _texts_of(tasks, name, _doc_ids(tasks, name, 0, cfg.holdout_limit)):
            if t in search_texts:
                raise ConfigError(cfg.file, f"evaluate.holdout.tasks[{i}]", f"holdout task {name!r} shares items with search task {search_texts[t]!r} (e.g. {t[:60]!r})")


# ------------------------------------------------------------------------------------ lm-eval glue


def _get_task_dict(names: list[str], tm) -> dict:
    import warnings

    _quiet_lm_eval()
    from lm_eval.tasks import get_task_dict

    with warnings.catch_warnings():
        # get_task_dict is deprecated in favour of TaskManager.load, but evaluate() still takes
        # the nested dict it returns.
        warnings.simplefilter("ignore", DeprecationWarning)
        return get_task_dict(names, tm)


def _leaf_tasks(task_dict: Mapping) -> dict[str, Any]:
    """Flatten lm-eval's nested task dict (groups map to dicts of subtasks) to name -> Task."""
    out: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, Mapping):
            out.update(_leaf_tasks(value))
        elif value is not None:
            out[key if isinstance(key, str) else str(key)] = value
    return out


def _doc_ids(tasks: Mapping[str, Any], name: str, start: int, count: int | None) -> list[int]:
    n = len(tasks[name].eval_docs)
    stop = n if count is None else min(n, start + count)
    return list(range(min(start, n), stop))


def _texts_of(tasks: Mapping[str, Any], name: str, ids: list[int]) -> list[str]:
    """Prompt + gold answer text of the given docs of one task."""
    task = tasks[name]
    docs = task.eval_docs
    out = []
    for i in ids:
        doc = docs[i]
        text = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if isinstance(target, int) and 0 <= target < len(choices):
                target = choices[target]
            elif isinstance(target, list) and target and isinstance(target[0], int):
                target = choices[target[0]]
        delim = task.config.target_delimiter or ""
        out.append(f"{text}{delim}{target}")
    return out


class Evaluator(ABC):
    """Scores a model on the search items or on the holdout items."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        """Score ``model`` (in memory) on ``split`` ("search" or "holdout")."""

    @abstractmethod
    def task_names(self, split: str = "search") -> list[str]:
        """Names of the tasks scored in ``split``."""

    def texts(self, split: str = "search") -> dict[str, list[str]]:
        """Prompt + gold answer strings per task of ``split`` (for the memorization probe)."""
        return {}

    def datasets(self) -> dict[str, list[str]]:
        """Dataset paths (hub ids or local files) per task; may be empty."""
        return {}


def _metric_value(res: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """(score, stderr) of ``metric`` in one task's lm-eval results; ``metric`` may name a filter
    (``exact_match,flexible-extract``), else ``,none`` is preferred, then the first filter."""
    keys = [metric] if "," in metric else [f"{metric},none"] + sorted(k for k in res if k.startswith(f"{metric},") and "_stderr" not in k)
    for key in keys:
        if key in res and isinstance(res[key], (int, float)):
            name, _, filt = key.partition(",")
            se = res.get(f"{name}_stderr,{filt}")
            se = float(se) if isinstance(se, (int, float)) else float("nan")
            return float(res[key]), se
    return None


@lru_cache(maxsize=1)
def _quiet_hflm_class():
    """``HFLM`` without its per-call progress bars (a search prints its own progress)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


class LMEvalEvaluator(Evaluator):
    """lm-evaluation-harness over an in-memory model.

    Task objects, datasets and prompts are built once here; each :meth:`evaluate` wraps the given
    model in a fresh ``HFLM`` (no copy of the weights) and runs lm-eval on the prebuilt tasks with no
    response cache, so consecutive candidates never share answers.

    Args:
        cfg: the parsed ``evaluate:`` section.
        tokenizer: the tokenizer of every candidate (they share the base's vocabulary).
        device: where inputs go (the model must already live there).
        batch_size: overrides ``cfg.batch_size``.

    Raises:
        ConfigError: a holdout range with no docs left after the search docs.
    """

    def __init__(self, cfg: EvalConfig, tokenizer, *, device: str = "cpu", batch_size: int | None = None) -> None:
        _quiet_lm_eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = int(batch_size or cfg.batch_size)
        local = _local_task_names(cfg.include_path) if cfg.include_path else set()
        all_specs = cfg.search + cfg.holdout
        tm = task_manager(tuple(cfg.include_path), not all(s.name in local for s in all_specs))
        self.task_manager = tm  # reused by the contamination flags (dataset of each task)
        self._dicts: dict[str, dict] = {"search": _get_task_dict([s.name for s in cfg.search], tm)}
        self._specs: dict[str, list[TaskSpec]] = {"search": list(cfg.search)}
        if cfg.holdout:
            self._dicts["holdout"] = _get_task_dict([s.name for s in cfg.holdout], tm)
            self._specs["holdout"] = list(cfg.holdout)
        elif cfg.holdout_limit is not None:
            self._dicts["holdout"] = self._dicts["search"]
            self._specs["holdout"] = list(cfg.search)
        self._leaves = {split: self._leaves_per_spec(split) for split in self._dicts}
        self._samples = {split: self._sample_ids(split) for split in self._dicts}

    # -- setup

    def _leaves_per_spec(self, split: str) -> dict[str, list[str]]:
        """spec name -> names of the leaf tasks it runs (a group has several); shots set here."""
        out: dict[str, list[str]] = {}
        for key, value in self._dicts[split].items():
            name = getattr(key, "group_name", None) or (key if isinstance(key, str) else str(key))
            leaves = _leaf_tasks(value) if isinstance(value, Mapping) else {name: value}
            out[name] = list(leaves)
            spec = next((s for s in self._specs[split] if s.name == name), None)
            for task in leaves.values():
                if spec is not None and spec.num_fewshot is not None:
                    task.set_config(key="num_fewshot", value=spec.num_fewshot)
                task.set_fewshot_seed(seed=1234)
        return out

    def _sample_ids(self, split: str) -> dict[str, list[int]]:
        cfg = self.cfg
        if split == "search":
            start, count = 0, cfg.limit
        elif cfg.holdout:
            start, count = 0, cfg.holdout_limit
        else:
            start, count = cfg.limit or 0, cfg.holdout_limit
        tasks = _leaf_tasks(self._dicts[split])
        ids = {name: _doc_ids(tasks, name, start, count) for name in tasks}
        for name, got in ids.items():
            if not got:
                raise ConfigError(cfg.file, "evaluate.holdout.limit" if split == "holdout" else "evaluate.limit", f"task {name!r} has no docs in the range [{start}, {start + (count or 0)}) ({len(tasks[name].eval_docs)} docs in all)")
        return ids

    # -- API

    def task_names(self, split: str = "search") -> list[str]:
        return [s.name for s in self._specs.get(split, [])]

    def texts(self, split: str = "search") -> dict[str, list[str]]:
        if split not in self._dicts:
            return {}
        tasks = _leaf_tasks(self._dicts[split])
        return {name: _texts_of(tasks, name, ids) for name, ids in self._samples[split].items()}

    def datasets(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for split in self._dicts:
            for name, task in _leaf_tasks(self._dicts[split]).items():
                c = task.config
                paths = [str(c.dataset_path)] if c.dataset_path else []
                files = (c.dataset_kwargs or {}).get("data_files")
                if isinstance(files, Mapping):
                    paths += [str(v) for v in files.values()]
                elif isinstance(files, (str, list)):
                    paths += [str(v) for v in (files if isinstance(files, list) else [files])]
                out[name] = paths
        return out

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        """Score ``model`` on the search or holdout items.

        Args:
            model: a ``transformers`` causal LM (in memory, on ``device``).
            split: "search" or "holdout".

        Returns:
            The :class:`EvalResult`; ``scores`` are fractions in [0, 1].

        Raises:
            EvomergeError: ``split`` is "holdout" and the config has none; a metric missing from
                lm-eval's results.
        """
        from evomerge.errors import EvomergeError

        if split not in self._dicts:
            raise EvomergeError(f"no {split} items configured (evaluate.holdout)")
        from lm_eval.evaluator import evaluate as lm_evaluate

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        _quiet_lm_eval()
        lm = _quiet_hflm_class()(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=self.device)
        import lm_eval.api.task as lm_task

        # lm-eval draws a progress bar per task per call while building requests; a search
        # prints its own progress, so swap it for a pass-through during the call.
        bar = lm_task.tqdm
        lm_task.tqdm = lambda it, *a, **k: it
        try:
            out = lm_evaluate(
                lm,
                self._dicts[split],
                samples=self._samples[split],
                bootstrap_iters=100,  # mean metrics use the closed form; this bounds the others
                log_samples=False,
                verbosity="ERROR",
            )
        finally:
            lm_task.tqdm = bar
        if was_training:
            model.train()
        results = (out or {}).get("results", {})
        scores: dict[str, float] = {}
        stderr: dict[str, float] = {}
        n_items: dict[str, int] = {}
        for spec in self._specs[split]:
            got = _metric_value(results.get(spec.name, {}), spec.metric)
            if got is None:
                have = sorted({k.split(",")[0] for k in results.get(spec.name, {}) if "," in k and "_stderr" not in k})
                raise EvomergeError(f"task {spec.name!r} reports no metric {spec.metric!r} (it reports: {', '.join(have) or 'nothing'})")
            scores[spec.name], stderr[spec.name] = got
            n_items[spec.name] = sum(len(self._samples[split].get(leaf, [])) for leaf in self._leaves[split][spec.name])
        agg, se = _aggregate(self._specs[split], scores, {k: (0.0 if math.isnan(v) else v) for k, v in stderr.items()})
        return EvalResult(scores, stderr, agg, se, time.perf_counter() - t0, n_items)


class FakeEvaluator(Evaluator):
    """A deterministic stand-in for lm-eval: scores a model from its tensors alone, in milliseconds.

    Each task ``k`` has a target value per decoder layer; a layer's statistic is the mean of its
    parameters, and the task's score is ``exp(-sum_l (stat_l - target_kl)^2 / width)``: a smooth
    landscape with one optimum per task, so a search has something real to climb. The holdout score
    is the same function with targets shifted by ``holdout_shift`` (a slightly different optimum).

    Args:
        targets: task name -> per-layer target statistics (length = number of layers).
        width: how quickly the score falls off.
        holdout_shift: added to every target for the holdout split.
    """

    def __init__(self, targets: Mapping[str, list[float]], *, width: float = 1e-3, holdout_shift: float = 0.0) -> None:
        self.targets = {k: torch.tensor(v, dtype=torch.float64) for k, v in targets.items()}
        self.width = width
        self.holdout_shift = holdout_shift

    @staticmethod
    def layer_stats(model: torch.nn.Module) -> torch.Tensor:
        """Mean parameter value of each decoder layer (``layers.<i>.`` in the parameter name)."""
        import re

        sums: dict[int, list[float]] = {}
        for name, p in model.named_parameters():
            m = re.search(r"layers\.(\d+)\.", name)
            if m:
                s = sums.setdefault(int(m.group(1)), [0.0, 0.0])
                s[0] += float(p.detach().double().sum())
                s[1] += p.numel()
        return torch.tensor([sums[i][0] / sums[i][1] for i in sorted(sums)], dtype=torch.float64)

    def task_names(self, split: str = "search") -> list[str]:
        return list(self.targets) if split == "search" else [f"{k}_holdout" for k in self.targets]

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        t0 = time.perf_counter()
        stats = self.layer_stats(model)
        shift = self.holdout_shift if split == "holdout" else 0.0
        scores, stderr, n = {}, {}, {}
        for name, target in zip(self.task_names(split), self.targets.values()):
            if target.numel() != stats.numel():
                raise ValueError(f"FakeEvaluator: {target.numel()} targets for {stats.numel()} layers")
            d2 = float(((stats - target - shift) ** 2).sum())
            scores[name] = math.exp(-d2 / self.width)
            stderr[name] = 0.01
            n[name] = 100
        specs = [TaskSpec(k) for k in scores]
        agg, se = _aggregate(specs, scores, stderr)
        return EvalResult(scores, stderr, agg, se, time.perf_counter() - t0, n)

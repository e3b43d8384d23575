"""The lm-evaluation-harness side of scoring: task index, task objects, and :class:`LMEvalEvaluator`.

Everything that imports ``lm_eval`` lives here and in :mod:`.scorer` (the LM that runs the model),
imported on first use: lm-eval's import and its task index cost seconds, so that parsing a search
space and the fake evaluator of the tests need none of it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import torch

from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluation.base import (
    SCORERS,
    EvalConfig,
    EvalResult,
    Evaluator,
    StagedEvaluation,
    TaskSpec,
    aggregate,
    digest_of,
    split_holdout,
)
from evomerge.evaluation.items import (
    LMEvalStaged,
    RequestBank,
    items_from_samples,
    metric_value,
    stageable,
)
from evomerge.evaluation.scorer import make_lm

__all__ = [
    "LMEvalEvaluator",
    "task_manager",
    "quiet_lm_eval",
    "local_task_names",
    "get_task_dict",
    "leaf_tasks",
    "doc_ids",
    "texts_of",
    "manager_for",
    "task_configs",
    "load_leaf_tasks",
    "DOC_SPLITS",
    "task_docs",
    "item_text",
    "path_list",
]


def quiet_lm_eval() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in (
        "lm-eval",
        "lm_eval",
        "lm_eval.evaluator",
        "lm_eval.api.task",
        "lm_eval.models.huggingface",
        "datasets",
    ):
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
    quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def local_task_names(include_path: Iterable[str]) -> set[str]:
    tm = task_manager(tuple(include_path), False)
    return set(tm.all_tasks)


def manager_for(task_names: Iterable[str], include_path: Any = None):
    """The cached ``TaskManager`` that knows ``task_names``: local tasks only when every name is
    found under ``include_path``, else lm-eval's bundled tasks too (local ones take precedence).

    Args:
        task_names: task, group or tag names.
        include_path: a directory, a (nested) list of them, or None.

    Returns:
        The ``lm_eval.tasks.TaskManager`` (the same object :func:`task_manager` caches).
    """
    names, paths = list(task_names), tuple(path_list(include_path))
    if paths:
        tm = task_manager(paths, False)
        if all(n in tm.task_index for n in names):
            return tm
    return task_manager(paths, True)


def path_list(value: Any) -> list[str]:
    """Every path in ``value``: one path, or (nested) lists of them; anything else gives none."""
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in path_list(v)]
    return []


def task_configs(task_names: Iterable[str], tm) -> dict[str, list[dict[str, Any]]]:
    """The YAML configs of the leaf tasks each name stands for, read from the task index: groups
    (inline members included) and tags are expanded recursively; no task is built, no data read.

    Args:
        task_names: task, group or tag names.
        tm: a ``TaskManager`` (see :func:`manager_for`).

    Returns:
        ``{name: [config, ...]}`` in input order; an unknown name maps to ``[]``.

    Example:
        >>> task_configs(["arc_challenge"], manager_for(["arc_challenge"]))["arc_challenge"][0]["dataset_path"]
        'allenai/ai2_arc'
    """
    return {n: _leaf_configs(n, tm, set()) for n in dict.fromkeys(task_names)}


def _leaf_configs(item: Any, tm, seen: set[str]) -> list[dict[str, Any]]:
    if isinstance(item, Mapping):  # an inline task or group inside a group config
        sub = item.get("task")
        if "group" in item or isinstance(sub, list):
            return [c for s in _members(sub) for c in _leaf_configs(s, tm, seen)]
        if isinstance(sub, str) and "dataset_path" not in item:
            return _leaf_configs(sub, tm, seen)
        return [dict(item)]
    name = str(item)
    if name in seen:
        return []
    seen.add(name)
    entry = tm.task_index.get(name)
    kind = getattr(getattr(entry, "kind", None), "name", "")
    cfg = getattr(entry, "cfg", None) or {}
    if kind == "TAG":
        return [c for t in sorted(entry.tags) for c in _leaf_configs(t, tm, seen)]
    if kind == "GROUP":
        return [c for t in _members(cfg.get("task")) for c in _leaf_configs(t, tm, seen)]
    return [dict(cfg)] if cfg else []


def _members(value: Any) -> list[Any]:
    return [v for v in (value if isinstance(value, list) else [value]) if v]


def load_leaf_tasks(task_names: Iterable[str], tm) -> dict[str, Any]:
    """Build the leaf ``Task`` objects of task, group or tag names (this reads their datasets).

    Returns:
        ``{task name: Task}``, groups expanded, in input order.
    """
    quiet_lm_eval()
    return dict(tm.load(list(task_names))["tasks"])


DOC_SPLITS = ("eval", "test", "validation", "train")
_SPLIT_API = {
    "test": ("has_test_docs", "test_docs"),
    "validation": ("has_validation_docs", "validation_docs"),
    "train": ("has_training_docs", "training_docs"),
}


def task_docs(task, split: str = "eval") -> Any:
    """The docs of one split of a task; ``"eval"`` is the split lm-eval scores (test, else validation).

    Raises:
        ValueError: ``split`` not in :data:`DOC_SPLITS`, or the task has no such split.
    """
    if split == "eval":
        return task.eval_docs
    if split not in _SPLIT_API:
        raise ValueError(f"split must be one of {', '.join(DOC_SPLITS)}; got {split!r}")
    has, get = _SPLIT_API[split]
    if not getattr(task, has)():
        raise ValueError(f"task {task.task_name} has no {split} split")
    return getattr(task, get)()


def get_task_dict(names: list[str], tm) -> dict:
    import warnings

    quiet_lm_eval()
    from lm_eval.tasks import get_task_dict

    with warnings.catch_warnings():
        # get_task_dict is deprecated in favour of TaskManager.load, but evaluate() still takes
        # the nested dict it returns.
        warnings.simplefilter("ignore", DeprecationWarning)
        return get_task_dict(names, tm)


def leaf_tasks(task_dict: Mapping) -> dict[str, Any]:
    """Flatten lm-eval's nested task dict (groups map to dicts of subtasks) to name -> Task."""
    out: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, Mapping):
            out.update(leaf_tasks(value))
        elif value is not None:
            out[key if isinstance(key, str) else str(key)] = value
    return out


def doc_ids(tasks: Mapping[str, Any], name: str, start: int, count: int | None) -> list[int]:
    n = len(tasks[name].eval_docs)
    stop = n if count is None else min(n, start + count)
    return list(range(min(start, n), stop))


def texts_of(tasks: Mapping[str, Any], name: str, ids: list[int]) -> list[str]:
    """Prompt + gold answer text of the given docs of one task."""
    task = tasks[name]
    docs = task.eval_docs
    return [item_text(task, docs[i]) for i in ids]


def item_text(task, doc: Any) -> str:
    """Prompt, target delimiter and gold answer of one doc of a task, as one string."""
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, int) and 0 <= target < len(choices):
            target = choices[target]
        elif isinstance(target, list) and target and isinstance(target[0], int):
            target = choices[target[0]]
    delim = task.config.target_delimiter or ""
    return f"{text}{delim}{target}"


class LMEvalEvaluator(Evaluator):
    """lm-evaluation-harness over an in-memory model.

    Task objects, datasets and prompts are built once here; each :meth:`evaluate` wraps the given
    model in a fresh lm-eval LM (no copy of the weights) and runs lm-eval on the prebuilt tasks with
    no response cache, so consecutive candidates never share answers.

    Args:
        cfg: the parsed ``evaluate:`` section.
        tokenizer: the tokenizer of every candidate (they share the base's vocabulary).
        device: where inputs go (the model must already live there).
        batch_size: overrides ``cfg.batch_size``.
        scorer: overrides ``cfg.scorer``: ``"shared"`` runs each context of a multiple-choice item
            once (:mod:`evomerge.evaluation.scorer`), ``"hflm"`` is lm-eval's ``HFLM`` as is.

    Raises:
        ConfigError: a holdout range with no docs left after the search docs.
        ValueError: an unknown ``scorer``.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        scorer: str | None = None,
    ) -> None:
        quiet_lm_eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = int(batch_size or cfg.batch_size)
        self.scorer = scorer or cfg.scorer
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        local = local_task_names(cfg.include_path) if cfg.include_path else set()
        all_specs = cfg.search + cfg.holdout
        tm = task_manager(tuple(cfg.include_path), not all(s.name in local for s in all_specs))
        self.task_manager = tm  # reused by the contamination flags (dataset of each task)
        self._dicts: dict[str, dict] = {"search": get_task_dict([s.name for s in cfg.search], tm)}
        self._specs: dict[str, list[TaskSpec]] = {"search": list(cfg.search)}
        if cfg.holdout:
            self._dicts["holdout"] = get_task_dict([s.name for s in cfg.holdout], tm)
            self._specs["holdout"] = list(cfg.holdout)
        elif cfg.holdout_limit is not None:
            self._dicts["holdout"] = self._dicts["search"]
            self._specs["holdout"] = list(cfg.search)
        self._leaves = {split: self._leaves_per_spec(split) for split in self._dicts}
        self._samples = {split: self._sample_ids(split) for split in self._dicts}
        if "holdout" in self._dicts:
            self._split_holdout()
        self._bank: RequestBank | None = None  # built on the first staged evaluation

    # -- setup

    def _leaves_per_spec(self, split: str) -> dict[str, list[str]]:
        """spec name -> names of the leaf tasks it runs (a group has several); shots set here."""
        out: dict[str, list[str]] = {}
        for key, value in self._dicts[split].items():
            name = getattr(key, "group_name", None) or (key if isinstance(key, str) else str(key))
            leaves = leaf_tasks(value) if isinstance(value, Mapping) else {name: value}
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
        tasks = leaf_tasks(self._dicts[split])
        ids = {name: doc_ids(tasks, name, start, count) for name in tasks}
        for name, got in ids.items():
            if not got:
                raise ConfigError(
                    cfg.file,
                    "evaluate.holdout.limit" if split == "holdout" else "evaluate.limit",
                    f"task {name!r} has no docs in the range [{start}, {start + (count or 0)}) ({len(tasks[name].eval_docs)} docs in all)",
                )
        return ids

    def _split_holdout(self) -> None:
        """The validation and test splits: each holdout task's items, interleaved
        (:func:`~evomerge.evaluation.base.split_holdout`); both must have items per task
        (validation none at all when its share is 0)."""
        cfg = self.cfg
        parts = {
            leaf: split_holdout(ids, cfg.validation)
            for leaf, ids in self._samples["holdout"].items()
        }
        for split, k in (("validation", 0), ("test", 1)):
            if split == "validation" and cfg.validation == 0:
                continue
            self._dicts[split] = self._dicts["holdout"]
            self._specs[split] = self._specs["holdout"]
            self._leaves[split] = self._leaves["holdout"]
            self._samples[split] = {leaf: p[k] for leaf, p in parts.items()}
            for spec in self._specs[split]:
                if not any(self._samples[split][leaf] for leaf in self._leaves[split][spec.name]):
                    raise ConfigError(
                        cfg.file,
                        "evaluate.holdout.validation",
                        f"task {spec.name!r} has {sum(len(self._samples['holdout'][leaf]) for leaf in self._leaves['holdout'][spec.name])} "
                        f"holdout item(s): too few to split into validation and test items at share {cfg.validation}",
                    )

    # -- API

    def task_names(self, split: str = "search") -> list[str]:
        return [s.name for s in self._specs.get(split, [])]

    def digest(self) -> str:
        """Tasks with metric, weight and shots, and each split's items (ids and texts) per task."""
        return digest_of(
            {
                split: {
                    "specs": [(s.name, s.metric, s.weight, s.num_fewshot) for s in specs],
                    "items": self._samples[split],
                    "texts": digest_of(self.texts(split)),
                }
                for split, specs in self._specs.items()
            }
        )

    def texts(self, split: str = "search") -> dict[str, list[str]]:
        if split not in self._dicts:
            return {}
        tasks = leaf_tasks(self._dicts[split])
        return {name: texts_of(tasks, name, ids) for name, ids in self._samples[split].items()}

    def prompts(self, split: str = "search") -> dict[str, list[str]]:
        if split not in self._dicts:
            return {}
        tasks = leaf_tasks(self._dicts[split])
        return {
            name: [str(tasks[name].doc_to_text(tasks[name].eval_docs[i])) for i in ids]
            for name, ids in self._samples[split].items()
        }

    def datasets(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for split in self._dicts:
            for name, task in leaf_tasks(self._dicts[split]).items():
                c = task.config
                paths = [str(c.dataset_path)] if c.dataset_path else []
                files = (c.dataset_kwargs or {}).get("data_files")
                if isinstance(files, Mapping):
                    paths += [str(v) for v in files.values()]
                elif isinstance(files, (str, list)):
                    paths += [str(v) for v in (files if isinstance(files, list) else [files])]
                out[name] = paths
        return out

    def item_counts(self) -> dict[str, int]:
        """Search items per task, or ``{}`` when a metric is not a mean of per-item values."""
        if stageable(
            leaf_tasks(self._dicts["search"]), self._leaves["search"], self._specs["search"]
        ):
            return {}
        return {
            s.name: sum(
                len(self._samples["search"][leaf]) for leaf in self._leaves["search"][s.name]
            )
            for s in self._specs["search"]
        }

    def specs(self) -> list[TaskSpec]:
        return list(self._specs["search"])

    def staged(self, model: torch.nn.Module) -> StagedEvaluation | None:
        """Score ``model`` on the search items in rounds (:mod:`evomerge.evaluation.items`); None
        when :meth:`item_counts` is empty."""
        if not self.item_counts():
            return None
        if self._bank is None:
            self._bank = RequestBank(leaf_tasks(self._dicts["search"]), self._samples["search"])
        model.eval()
        lm = make_lm(
            model,
            self.tokenizer,
            scorer=self.scorer,
            batch_size=self.batch_size,
            device=self.device,
        )
        return LMEvalStaged(
            self._bank,
            self._specs["search"],
            self._leaves["search"],
            lm,
            lambda memo: self._run(model, memo, "search"),
        )

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        """Score ``model`` on the search or holdout items.

        Args:
            model: a ``transformers`` causal LM (in memory, on ``device``).
            split: one of :data:`~evomerge.evaluation.base.SPLITS`.

        Returns:
            The :class:`EvalResult`; ``scores`` are fractions in [0, 1], ``items`` each task's
            per-item values.

        Raises:
            EvomergeError: ``split`` is "holdout" and the config has none; a metric missing from
                lm-eval's results.
        """
        if split not in self._dicts:
            raise EvomergeError(
                f"no {split} items configured (evaluate.holdout"
                + (
                    ".validation is 0)"
                    if split == "validation" and "holdout" in self._dicts
                    else ")"
                )
            )
        quiet_lm_eval()
        return self._run(
            model,
            make_lm(
                model,
                self.tokenizer,
                scorer=self.scorer,
                batch_size=self.batch_size,
                device=self.device,
            ),
            split,
        )

    def _run(self, model: torch.nn.Module, lm: Any, split: str) -> EvalResult:
        import lm_eval.api.task as lm_task
        from lm_eval.evaluator import evaluate as lm_evaluate

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        # lm-eval's evaluate() draws few-shot examples from each task's generator where the previous
        # call left it: reseed, so that every candidate is scored on the same prompts.
        for task in leaf_tasks(self._dicts[split]).values():
            task.set_fewshot_seed(seed=1234)

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
                log_samples=True,  # per-item values (paired comparisons)
                verbosity="ERROR",
            )
        finally:
            lm_task.tqdm = bar
        if was_training:
            model.train()
        results = (out or {}).get("results", {})
        tasks = leaf_tasks(self._dicts[split])
        scores: dict[str, float] = {}
        stderr: dict[str, float] = {}
        n_items: dict[str, int] = {}
        items: dict[str, list[float | None]] = {}
        for spec in self._specs[split]:
            got = metric_value(results.get(spec.name, {}), spec.metric)
            if got is None:
                have = sorted(
                    {
                        k.split(",")[0]
                        for k in results.get(spec.name, {})
                        if "," in k and "_stderr" not in k
                    }
                )
                raise EvomergeError(
                    f"task {spec.name!r} reports no metric {spec.metric!r} (it reports: {', '.join(have) or 'nothing'})"
                )
            scores[spec.name], stderr[spec.name] = got
            leaves = self._leaves[split][spec.name]
            n_items[spec.name] = sum(len(self._samples[split].get(leaf, [])) for leaf in leaves)
            items[spec.name] = items_from_samples(
                (out or {}).get("samples", {}), spec, leaves, self._samples[split], tasks
            )
        agg, se = aggregate(
            self._specs[split],
            scores,
            {k: (0.0 if math.isnan(v) else v) for k, v in stderr.items()},
        )
        return EvalResult(scores, stderr, agg, se, time.perf_counter() - t0, n_items, items)

"""Which items every split of an evaluation scores: the search items, the holdout items, and the
holdout's validation and test parts (:func:`~evomerge.evaluation.base.split_holdout`), as lm-eval
task objects and doc ids; what the items say (texts, prompts) and where they come from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluation.base import EvalConfig, TaskSpec, digest_of, split_holdout
from evomerge.evaluation.hflm import reseed_fewshot
from evomerge.evaluation.tasks import (
    doc_ids,
    get_task_dict,
    item_text,
    leaf_tasks,
    manager_for,
    texts_of,
)

__all__ = ["Splits"]


class Splits:
    """The task objects and items of each split of an ``evaluate:`` section, built once (this
    loads the tasks' datasets), and what an evaluator tells of them (task names, texts, prompts,
    datasets, digest): the base of :class:`~evomerge.evaluation.lmeval.LMEvalEvaluator`.

    Attributes:
        dicts: split -> lm-eval's nested task dict.
        task_specs: split -> the task specs scored there.
        leaves: split -> spec name -> its leaf task names (a group has several).
        samples: split -> leaf task name -> the doc ids of its items, ascending.
        tm: the lm-eval ``TaskManager`` the tasks come from.

    Raises:
        ConfigError: a range with no docs, or holdout tasks too small to split.
    """

    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        # reused by the contamination flags (dataset of each task)
        self.tm = tm = manager_for([s.name for s in cfg.search + cfg.holdout], cfg.include_path)
        self.dicts: dict[str, dict] = {"search": get_task_dict([s.name for s in cfg.search], tm)}
        self.task_specs: dict[str, list[TaskSpec]] = {"search": list(cfg.search)}
        if cfg.holdout:
            self.dicts["holdout"] = get_task_dict([s.name for s in cfg.holdout], tm)
            self.task_specs["holdout"] = list(cfg.holdout)
        elif cfg.holdout_limit is not None:
            self.dicts["holdout"] = self.dicts["search"]
            self.task_specs["holdout"] = list(cfg.search)
        self.leaves = {split: self._leaves_per_spec(split) for split in self.dicts}
        self.samples = {split: self._sample_ids(split) for split in self.dicts}
        if "holdout" in self.dicts:
            self._split_holdout()

    def _leaves_per_spec(self, split: str) -> dict[str, list[str]]:
        """spec name -> names of the leaf tasks it runs (a group has several); shots set here."""
        out: dict[str, list[str]] = {}
        for key, value in self.dicts[split].items():
            name = getattr(key, "group_name", None) or str(key)
            leaves = leaf_tasks(value) if isinstance(value, Mapping) else {name: value}
            out[name] = list(leaves)
            shots = next((s.num_fewshot for s in self.task_specs[split] if s.name == name), None)
            for task in leaves.values() if shots is not None else ():
                task.set_config(key="num_fewshot", value=shots)
            reseed_fewshot(leaves.values())
        return out

    def _sample_ids(self, split: str) -> dict[str, list[int]]:
        cfg = self.cfg
        if split == "search":
            start, count = 0, cfg.limit
        elif cfg.holdout:
            start, count = 0, cfg.holdout_limit
        else:
            start, count = cfg.limit or 0, cfg.holdout_limit
        tasks = leaf_tasks(self.dicts[split])
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
            for leaf, ids in self.samples["holdout"].items()
        }
        for split, k in (("validation", 0), ("test", 1)):
            if split == "validation" and cfg.validation == 0:
                continue
            self.dicts[split] = self.dicts["holdout"]
            self.task_specs[split] = self.task_specs["holdout"]
            self.leaves[split] = self.leaves["holdout"]
            self.samples[split] = {leaf: p[k] for leaf, p in parts.items()}
            for name, n in self.counts(split).items():
                if not n:
                    raise ConfigError(
                        cfg.file,
                        "evaluate.holdout.validation",
                        f"task {name!r} has {self.counts('holdout')[name]} "
                        f"holdout item(s): too few to split into validation and test items at share {cfg.validation}",
                    )

    def task_names(self, split: str = "search") -> list[str]:
        return [s.name for s in self.task_specs.get(split, [])]

    def texts(self, split: str = "search") -> dict[str, list[str]]:
        """Prompt + gold answer of each item of ``split``, per leaf task ({} for no such split)."""
        return self._per_item(split, item_text)

    def prompts(self, split: str = "search") -> dict[str, list[str]]:
        """The prompt of each item of ``split``, per leaf task."""
        return self._per_item(split, lambda task, doc: str(task.doc_to_text(doc)))

    def _per_item(self, split: str, text: Callable[[Any, Any], str]) -> dict[str, list[str]]:
        tasks = leaf_tasks(self.dicts.get(split, {}))
        return {
            name: texts_of(tasks, name, ids, text)
            for name, ids in self.samples.get(split, {}).items()
        }

    def datasets(self) -> dict[str, list[str]]:
        """Dataset paths (hub ids or local files) of every leaf task."""
        out: dict[str, list[str]] = {}
        for split in self.dicts:
            for name, task in leaf_tasks(self.dicts[split]).items():
                c = task.config
                paths = [str(c.dataset_path)] if c.dataset_path else []
                files = (c.dataset_kwargs or {}).get("data_files")
                if isinstance(files, Mapping):
                    paths += [str(v) for v in files.values()]
                elif isinstance(files, (str, list)):
                    paths += [str(v) for v in (files if isinstance(files, list) else [files])]
                out[name] = paths
        return out

    def tasks_index(self) -> Any:
        return self.tm

    def counts(self, split: str) -> dict[str, int]:
        """Items per spec of ``split``."""
        return {
            s.name: sum(len(self.samples[split][leaf]) for leaf in self.leaves[split][s.name])
            for s in self.task_specs.get(split, [])
        }

    def digest(self) -> str:
        """Tasks with metric, weight and shots, and each split's items (ids and texts)."""
        return digest_of(
            {
                split: {
                    "specs": [(s.name, s.metric, s.weight, s.num_fewshot) for s in specs],
                    "items": self.samples[split],
                    "texts": digest_of(self.texts(split)),
                }
                for split, specs in self.task_specs.items()
            }
        )

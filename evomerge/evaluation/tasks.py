"""lm-eval's task index and task objects: names looked up, tasks and docs loaded, the text of
an item. ``lm_eval`` is imported on first use only: its import and its task index cost seconds,
and parsing a search space or reading a study needs none of it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

__all__ = [
    "task_manager",
    "quiet_lm_eval",
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
    import datasets  # a dependency of lm-eval: its progress bars during loading

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


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


def task_docs(task, split: str = "eval") -> Any:
    """The docs of one split of a task; ``"eval"`` is the split lm-eval scores (test, else validation).

    Raises:
        ValueError: ``split`` not in :data:`DOC_SPLITS`, or the task has no such split.
    """
    if split == "eval":
        return task.eval_docs
    if split not in DOC_SPLITS:
        raise ValueError(f"split must be one of {', '.join(DOC_SPLITS)}; got {split!r}")
    api = "training" if split == "train" else split  # has_training_docs, training_docs
    if not getattr(task, f"has_{api}_docs")():
        raise ValueError(f"task {task.task_name} has no {split} split")
    return getattr(task, f"{api}_docs")()


def get_task_dict(names: list[str], tm) -> dict:
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
            out[str(key)] = value
    return out


def doc_ids(tasks: Mapping[str, Any], name: str, start: int, count: int | None) -> list[int]:
    n = len(tasks[name].eval_docs)
    stop = n if count is None else min(n, start + count)
    return list(range(min(start, n), stop))


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


def texts_of(
    tasks: Mapping[str, Any],
    name: str,
    ids: list[int],
    text: Callable[[Any, Any], str] = item_text,
) -> list[str]:
    """``text(task, doc)`` of the given docs of one task (by default prompt + gold answer)."""
    task = tasks[name]
    docs = task.eval_docs
    return [text(task, docs[i]) for i in ids]

"""Which datasets the evaluation tasks read, and which of them a source's lineage declares as training data.

A task's datasets come from its lm-eval YAML config (no data is downloaded): the hub
``dataset_path`` (``allenai/ai2_arc``), or for local ``json``/``csv``/... tasks the file names of
the evaluation split. A card ``datasets:`` entry of a source, or of one of its ancestors, that
names one of them is a :class:`DatasetHit`. Names are compared without case, organisation prefix
or file extension (:func:`norm_dataset`: "allenai/ai2_arc" matches "ai2_arc"). A card does not
say which split was used, so a hit marks a risk, not a proof.

Example::

    ds = task_datasets(["arc_challenge"])           # {"arc_challenge": {"allenai/ai2_arc"}}
    eval_data_in_training(["out/merged"], ds)       # {"out/merged": [DatasetHit(...), ...]}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from evomerge.contamination.lineage import Lineage, Resolver, default_resolve, model_lineage
from evomerge.evaluation.tasks import manager_for, path_list, task_configs

__all__ = ["DatasetHit", "task_datasets", "norm_dataset", "dataset_hits", "eval_data_in_training"]

_LOCAL_DATA_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
_DATA_EXTS = (".gz", ".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
_ALIASES = {"hendrycks_test": "mmlu", "truthful_qa": "truthfulqa"}


class DatasetHit(NamedTuple):
    """A card ``datasets:`` entry that an evaluation task also reads."""

    source: str  # the source model of the search
    via: str  # the model whose card lists the dataset (source itself or an ancestor)
    card_dataset: str  # the entry as written in the card
    task: str  # the evaluation task (as requested)
    task_dataset: str  # the dataset the task reads


def _config_datasets(cfg: Mapping[str, Any]) -> set[str]:
    """Datasets one lm-eval task config reads: the hub id, or the evaluation data files."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path.strip():
        return set()
    if path not in _LOCAL_DATA_BUILDERS:
        return {path}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        splits = [cfg.get("test_split"), cfg.get("validation_split")]
        picked = [files[s] for s in splits if isinstance(s, str) and s in files]
        files = picked or list(files.values())
    return {f for f in path_list(files) if f} or {path}


def task_datasets(
    task_names: Iterable[str], include_path: Any = None, *, task_manager: Any = None
) -> dict[str, set[str]]:
    """The datasets each lm-eval task reads, from its YAML config (no data is downloaded).

    Groups and tags are expanded to their member tasks. Hub datasets are given as their
    ``dataset_path`` (e.g. ``allenai/ai2_arc``); local ``json``/``csv``/... tasks as the
    file names of their evaluation split (all files when the split cannot be told).

    Args:
        task_names: lm-eval task, group or tag names.
        include_path: directory (or list) of extra task YAMLs, as given to lm-eval.
        task_manager: an ``lm_eval.tasks.TaskManager`` to use instead of building one.
    Returns:
        ``{task: {dataset, ...}}``; an unknown task maps to an empty set.
    """
    names = list(dict.fromkeys(task_names))
    tm = task_manager if task_manager is not None else manager_for(names, include_path)
    return {
        n: set().union(*(_config_datasets(c) for c in cfgs))
        for n, cfgs in task_configs(names, tm).items()
    }


def norm_dataset(name: str) -> str:
    """Comparable dataset name: no case, organisation/directory prefix or file extension.

    Example:
        >>> norm_dataset("allenai/AI2_ARC"), norm_dataset("data/Zoo-Add-Test.jsonl.gz")
        ('ai2_arc', 'zoo_add_test')
    """
    s = name.strip().replace("\\", "/").rstrip("/").lower().rsplit("/", 1)[-1]
    while True:
        ext = next((e for e in _DATA_EXTS if s.endswith(e) and len(s) > len(e)), None)
        if ext is None:
            break
        s = s[: -len(ext)]
    s = s.replace("-", "_")
    return _ALIASES.get(s, s)


def dataset_hits(source: Lineage, datasets: Mapping[str, Iterable[str]]) -> list[DatasetHit]:
    """Card ``datasets:`` entries of a source's lineage (itself and its ancestors) that tasks read.

    Args:
        source: the source's lineage (see :func:`~evomerge.contamination.lineage.model_lineage`).
        datasets: ``{task: datasets}`` as returned by :func:`task_datasets`.
    Returns:
        The hits, without repeats, in lineage order.
    """
    hits: list[DatasetHit] = []
    for node in source.walk():
        for entry in node.datasets:
            key = norm_dataset(entry)
            for task, used in datasets.items():
                for ds in sorted(used):
                    if norm_dataset(ds) == key:
                        hits.append(DatasetHit(source.model, node.model, entry, task, ds))
    return list(dict.fromkeys(hits))


def eval_data_in_training(
    model_refs: Iterable[str],
    datasets: Mapping[str, Iterable[str]],
    resolve: Resolver = default_resolve,
) -> dict[str, list[DatasetHit]]:
    """Card ``datasets:`` entries (of each model and its local ancestors) that tasks read.

    Args:
        model_refs: source models of the search.
        datasets: ``{task: datasets}`` as returned by :func:`task_datasets`.
        resolve: see :func:`~evomerge.contamination.lineage.model_lineage`.
    Returns:
        ``{model: [DatasetHit, ...]}`` with an entry (possibly empty) for every model.
    """
    return {ref: dataset_hits(model_lineage(ref, resolve), datasets) for ref in model_refs}

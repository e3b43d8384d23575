"""Baselines: what the search must beat, scored like every trial.

Every source model alone, the uniform average of the fine-tunes, and the space's hand recipes. A
hand recipe that is a point of the space is queued as the first searched trial instead, so that
the sampler learns from it; so is the own path of a data-flow space's merge sources (its layers in
order, scales 1: :mod:`evomerge.dataflow.start`), as a searched trial that can be chosen. The
others are scored by :meth:`~evomerge.search.finalists.Holdout.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evomerge.dataflow.section import plain_sources, recipe_sources
from evomerge.dataflow.start import source_paths
from evomerge.io import dump_yaml
from evomerge.search.records import StudyRecords
from evomerge.space import Space
from evomerge.space.directives import LayersOf

__all__ = ["baseline_recipes", "enqueue_first_trials"]


def baseline_recipes(space: Space, layers_of: LayersOf | None = None) -> dict[str, dict[str, Any]]:
    """``{name: recipe}``: ``source:<ref>`` for each model, ``uniform``, and ``hand:<name>``.

    Args:
        space: the parsed space.
        layers_of: the layer count of a model reference. A data-flow space may run the layers of
            models of different depths, which no average merges: it has a ``uniform`` baseline
            only where its model sources have one layer count (always without ``layers_of``).
    """
    dataflow = space.tree.get("dataflow")
    # A data-flow space's baselines are its sources (a merge source's base model is no source).
    refs = space.model_refs() if dataflow is None else plain_sources(dataflow)
    base = space.tree.get("base_model") if isinstance(space.tree.get("base_model"), str) else None
    dtype = space.tree.get("dtype")
    extra = {"dtype": dtype} if isinstance(dtype, str) else {}
    out: dict[str, dict[str, Any]] = {}
    for ref in refs:
        out[f"source:{ref}"] = {
            "merge_method": "linear",
            "models": [{"model": ref, "parameters": {"weight": 1.0}}],
            **extra,
        }
    tuned = [r for r in refs if r != base]
    if len(tuned) < 2:
        tuned = refs
    same_depth = dataflow is None or layers_of is None or len({layers_of(r) for r in tuned}) == 1
    if len(tuned) >= 2 and same_depth:
        out["uniform"] = {
            "merge_method": "linear",
            "models": [{"model": r, "parameters": {"weight": 1.0}} for r in tuned],
            **extra,
        }
    if dataflow is not None:  # a merge whose layers a data-flow search runs, on its own
        for name, merge in recipe_sources(dataflow):
            out[f"source:{name}"] = dict(merge)
    for name, recipe in space.search.baselines:
        out[f"hand:{name}"] = dict(recipe)
    return out


def enqueue_first_trials(
    space: Space,
    recipes: dict[str, dict[str, Any]],
    records: StudyRecords,
    *,
    layers_of: Callable[[str], int],
    log: Callable[[str], None],
) -> None:
    """Queue as searched trials the own path of each source ``dataflow.start`` names (the merge
    sources by default; a path that is no point of the space is skipped with one log line), then
    each hand recipe that is a point of the space. Once per study: run under the study's ``setup``
    claim; a resumed study skips those it has, and queues again one whose recipe changed.

    Args:
        space: the space (a data-flow one checked against its models by
            :func:`~evomerge.search.setup.prepare`).
        recipes: the baselines, from :func:`baseline_recipes`.
        records: the study's records.
        layers_of: a model reference's layer count.
        log: progress lines.
    """
    for p in source_paths(space.tree["dataflow"], layers_of) if "dataflow" in space.tree else ():
        what = f"dataflow source {p.source}: its own path ({len(p.path)} layers, scales 1)"
        if p.values is None:
            log(f"{what} is no point of the space ({p.why}): not queued")
            continue
        recipe, said = space.render_values(p.values, layers_of), f"{what} queued as a first trial"
        _enqueue(records, f"path:{p.source}", recipe, p.values, {}, log, said)
    for name, recipe in recipes.items():
        values = space.values_of(recipe, layers_of) if name.startswith("hand:") else None
        if values is not None:
            said = f"baseline {name}: a point of the space, queued as the first trial"
            _enqueue(records, name, recipe, values, {"baseline": name}, log, said)


def _enqueue(
    records: StudyRecords,
    name: str,
    recipe: dict[str, Any],
    values: dict[str, Any],
    user_attrs: dict[str, Any],
    log: Callable[[str], None],
    said: str,
) -> None:
    text = dump_yaml(recipe)
    if records.baseline_done(name, text):
        return
    if records.baseline_done(name):
        log(f"{name}: its recipe changed since it was queued; queued again")
    records.study.enqueue_trial(values, user_attrs=user_attrs)
    records.mark_enqueued(name, text)
    log(said)

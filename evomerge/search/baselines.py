"""Baselines: what the search must beat, scored like every trial.

Every source model alone, the uniform average of the fine-tunes, and the space's hand recipes. A
hand recipe that is a point of the space is queued as the first searched trial instead, so that
the sampler learns from it; so is the own path of a data-flow space's merge sources (its layers in
order, scales 1: :mod:`evomerge.dataflow.start`), as a searched trial that can be chosen. With
several workers, each baseline is scored by one of them (a claim
``baseline:<name>``, see :mod:`evomerge.search.distributed.claims`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from evomerge.dataflow.section import plain_sources, recipe_sources
from evomerge.dataflow.start import source_paths
from evomerge.errors import failure_line
from evomerge.io import dump_yaml
from evomerge.search.candidates import Candidates
from evomerge.search.distributed.coordinator import Coordinator
from evomerge.search.records import StudyRecords, TrialRecord
from evomerge.space import Space
from evomerge.space.directives import LayersOf

__all__ = ["baseline_recipes", "enqueue_first_trials", "run_baselines"]


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
        recipe = space.render_values(p.values, layers_of)
        _enqueue(
            records,
            f"path:{p.source}",
            recipe,
            p.values,
            {},
            log,
            f"{what} queued as a first trial",
        )
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


def run_baselines(
    space: Space,
    recipes: dict[str, dict[str, Any]],
    candidates: Candidates,
    records: StudyRecords,
    coordinator: Coordinator,
    *,
    splits: tuple[str, ...],
    log: Callable[[str], None],
    check_interrupt: Callable[[], None],
    wait: bool,
) -> None:
    """Score every baseline not scored yet, each once across the study's workers.

    Args:
        space: the search space.
        recipes: the baselines, from :func:`baseline_recipes` (hand recipes queued as trials by
            :func:`enqueue_first_trials` are done already).
        candidates: merges and scores.
        records: the study's records.
        coordinator: runs each baseline in one worker of the study (``baseline:<name>``).
        splits: the holdout splits to score too (validation, test).
        log: progress lines.
        check_interrupt: raises KeyboardInterrupt once Ctrl-C was pressed.
        wait: wait for baselines another worker is scoring (at the end of a search); False: leave
            them to it and return (at the start, so that every worker gets to work).
    """
    for name, recipe in recipes.items():
        check_interrupt()
        text = dump_yaml(recipe)
        if not _done(records, name, text) and records.baseline_done(name):
            log(f"baseline {name}: its recipe changed since it was scored; scoring it again")
        coordinator.once(
            f"baseline:{name}",
            done=partial(_done, records, name, text),
            work=partial(_score_baseline, space, name, recipe, candidates, records, splits, log),
            wait=wait,
            check_interrupt=check_interrupt,
        )


def _done(records: StudyRecords, name: str, recipe: str) -> bool:
    return records.refresh().baseline_done(name, recipe)


def _score_baseline(
    space: Space,
    name: str,
    recipe: dict[str, Any],
    candidates: Candidates,
    records: StudyRecords,
    splits: tuple[str, ...],
    log: Callable[[str], None],
) -> None:
    rec = TrialRecord(
        method=recipe.get("merge_method") or ("moe" if "experts" in recipe else None),
        recipe=dump_yaml(recipe),
    )
    try:
        t0 = time.perf_counter()
        model, res = candidates.materialize(recipe, f"{space.file} (baseline {name})")
        rec.merge_s, rec.digest = time.perf_counter() - t0, res.digest
        rec.search = candidates.score(model, "search")
        rec.eval_s = rec.search.seconds
        for split in splits:
            setattr(rec, split, candidates.score(model, split))
        rec.state = "COMPLETE"
        log(
            f"baseline {name:<28} search {rec.search.aggregate:.3f}"
            + "".join(f"  {k} {v.aggregate:.3f}" for k in splits if (v := getattr(rec, k)))
        )
    except KeyboardInterrupt:
        raise
    except Exception as e:  # a baseline that cannot be merged or scored is reported, not fatal
        rec.state, rec.error = "FAIL", failure_line(e)
        log(f"baseline {name}: failed: {rec.error}")
    records.set_baseline(name, rec)

"""The slots of a ``dataflow:`` section (see :mod:`evomerge.dataflow.section`): the layer sequence
repeated, checked against the opened models, and a point of the space rendered as a candidate."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from evomerge.dataflow.candidate import METHOD
from evomerge.dataflow.model import check_compatible
from evomerge.dataflow.section import recipe_refs
from evomerge.errors import ConfigError

__all__ = [
    "check_section",
    "render_dataflow",
    "searched_slots",
    "sequence",
    "slot_names",
    "source_layers",
]

Suggest = Callable[[str, Any], Any]


def source_layers(s: Mapping[str, Any], layers_of: Callable[[str], int]) -> int:
    """Layers of a source: a model's, or the output of a merge recipe.

    Raises:
        ConfigError: a study source not resolved yet.
    """
    if "model" in s:
        return layers_of(s["model"])
    recipe = s.get("recipe")
    if not isinstance(recipe, Mapping):
        raise ConfigError(
            None,
            "dataflow.sources",
            f"study source {s['name']!r} is not resolved yet (a search resolves it when it starts)",
        )
    if recipe.get("slices"):
        return sum(
            int(sl["sources"][0]["layer_range"][1]) - int(sl["sources"][0]["layer_range"][0])
            for sl in recipe["slices"]
        )
    return layers_of(recipe_refs(recipe)[0])


def sequence(
    section: Mapping[str, Any], layers_of: Callable[[str], int]
) -> list[tuple[int, str, int]]:
    """The slots: ``(repeat, source name, layer)`` in order."""
    one = []
    for s in section["sources"]:
        n = source_layers(s, layers_of)
        lo, hi = s["layers"] if s["layers"] is not None else (0, n)
        one += [(s["name"], layer) for layer in range(lo, hi)]
    return [(r, name, layer) for r in range(section["repeats"]) for name, layer in one]


def slot_names(section: Mapping[str, Any], layers_of: Callable[[str], int]) -> list[str]:
    """Each slot's name (``r<repeat>.<source>.<layer>``), in order."""
    return [f"r{r}.{name}.{layer}" for r, name, layer in sequence(section, layers_of)]


def searched_slots(section: Mapping[str, Any], total: int) -> set[int]:
    """The slots that may take part (``dataflow.slots``), of ``total`` slots."""
    if section["slots"] is None:
        return set(range(total))
    out: set[int] = set()
    for x in section["slots"]:
        out |= set(range(x[0], x[1])) if isinstance(x, list) else {x}
    return out


def check_section(
    section: Mapping[str, Any],
    file: str,
    sources: Mapping[str, Any],
    layers_of: Callable[[str], int],
) -> dict[str, Any]:
    """Check the section against the opened models (once a search has them).

    Args:
        section: the parsed section (study sources resolved).
        file: the space file, for messages.
        sources: opened models by reference (:class:`~evomerge.engine.sources.ModelSource`).
        layers_of: a model reference's layer count.

    Returns:
        The section with what rendering needs of the models: ``params``, the parameters outside
        the layers and per layer (``max_params`` caps paths by them).

    Raises:
        ConfigError: a layer range beyond a source's layers, a slot beyond the slots, no slot that
            can take part, sources of different model types, hidden sizes or vocabularies, or a
            ``max_params`` below a one-step path.
    """
    items, refs = [], []
    for i, s in enumerate(section["sources"]):
        fld = f"dataflow.sources[{i}]"
        n = source_layers(s, layers_of)
        if s["layers"] is not None and s["layers"][1] > n:
            raise ConfigError(
                file,
                f"{fld}.layers",
                f"{s['layers']!r} goes beyond the {n} layers of {s['name']} (layers 0..{n - 1})",
            )
        ref = s["model"] if "model" in s else recipe_refs(s["recipe"])[0]
        refs.append(ref)
        src = sources[ref]
        prefix = src.arch.layer_prefix
        shapes = {
            k[len(prefix) + 3 :]: src.shape(k)
            for k in src.names()
            if prefix and k.startswith(f"{prefix}.0.")
        }
        items.append((s["name"], src.config, shapes, fld))
    check_compatible(items, file)
    total = len(sequence(section, layers_of))
    bad = (
        sorted(x for x in searched_slots(section, 10**9) if x >= total)
        if section["slots"] is not None
        else []
    )
    if bad:
        raise ConfigError(
            file,
            "dataflow.slots",
            f"slot {bad[0]} is beyond the {total} slots ({section['repeats']} repeats of {total // section['repeats']} layers: slots 0..{total - 1})",
        )
    outside, per = _param_counts(sources[refs[0]])
    if section["max_params"] is not None and section["max_params"] < outside + per:
        raise ConfigError(
            file,
            "dataflow.max_params",
            f"{section['max_params']} is below a one-layer path ({outside + per} parameters: {outside} outside the layers, {per} per layer)",
        )
    return {**section, "params": [outside, per]}


def _param_counts(src: Any) -> tuple[int, int]:
    outside = per = 0
    prefix = src.arch.layer_prefix
    for k in src.names():
        n = math.prod(src.shape(k))
        if src.arch.split(k) is None:
            outside += n
        elif k.startswith(f"{prefix}.0."):
            per += n
    return outside, per


# ----------------------------------------------------------------------------- rendering


def render_dataflow(
    section: Mapping[str, Any], suggest: Suggest, layers_of: Callable[[str], int]
) -> dict[str, Any]:
    """The candidate (``merge_method: dataflow``) at the point ``suggest`` picks.

    Args:
        section: the parsed section (study sources resolved).
        suggest: ``(parameter name, directive) -> value``.
        layers_of: a model reference's layer count.

    Returns:
        The candidate mapping (see :mod:`evomerge.dataflow.candidate`).

    Raises:
        ConfigError: no slot is on at this point (the trial fails).
    """
    seq = sequence(section, layers_of)
    searched = searched_slots(section, len(seq))
    fixed = {0} if section["first"] == "fixed" else set()
    if section["last"] == "fixed":
        fixed.add(len(seq) - 1)
    flat = section["layout"] == "flat"
    steps = []
    for k, (r, name, layer) in enumerate(seq):
        tag = f"r{r}.{name}.{layer}"
        if k in fixed:
            on = True
        elif k in searched:
            v = suggest(f"use.{tag}", section["use"])
            on = bool(v > 0.5) if flat else bool(v)
        else:
            continue
        scale = section["scale"]
        s = (
            float(suggest(f"scale.{tag}", scale))
            if not isinstance(scale, float) and (on or flat)
            else scale
        )
        if on:
            steps.append([name, layer, s])
    if not steps:
        raise ConfigError(
            None, "dataflow.slots", "no slot is on at this point: the path has no layers"
        )
    steps = _capped(steps, section, last_fixed=section["last"] == "fixed")
    out: dict[str, Any] = {
        "merge_method": METHOD,
        "sources": {s["name"]: s.get("model") or s.get("recipe") for s in section["sources"]},
        "path": steps,
    }
    if section["dtype"] is not None:
        out["dtype"] = section["dtype"]
    return out


def _capped(
    steps: list[list[Any]], section: Mapping[str, Any], *, last_fixed: bool
) -> list[list[Any]]:
    cap = section["max_depth"]
    if section["max_params"] is not None and section.get("params") is not None:
        outside, per = section["params"]
        by_params = max(1, (section["max_params"] - outside) // per)
        cap = by_params if cap is None else min(cap, by_params)
    if cap is None or len(steps) <= cap:
        return steps
    return steps[: cap - 1] + [steps[-1]] if last_fixed and cap > 1 else steps[:cap]

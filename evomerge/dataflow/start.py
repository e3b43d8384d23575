"""Where a data-flow search starts: each source's own path, as a point of the space.

A source's *own path* runs its layers in order (its ``layers:`` range), every scale 1: the source
itself, computed as a path (for a merge source, the merge). ``dataflow.start`` names the sources
whose own paths the search queues as its first trials, so that the sampler learns from them and
the second stage of PS+DFS can never end below the first stage's merge on search score:

- ``merges`` (the default): the merge sources (``recipe:`` and ``study:``);
- ``sources``: every source, models too;
- ``none``: nothing is queued.

A path is queued only where it is a point of the space: its layers on slots that may take part, in
order (from any repeat of the sequence), every fixed slot among them, scale 1 inside
``dataflow.scale``, and no longer than ``max_depth`` and ``max_params`` allow.
:func:`source_paths` says, for each source ``start`` names, the parameter values of that point or
why there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.dataflow.section import START
from evomerge.dataflow.slots import render_dataflow, searched_slots, sequence, source_layers

__all__ = ["SourcePath", "source_paths"]


@dataclass(frozen=True)
class SourcePath:
    """A source's own path.

    Attributes:
        source: the source's name.
        path: its steps, ``[source, layer, 1.0]``.
        values: the parameter values that render to it, or None when it is no point of the space.
        why: what keeps it out of the space ("" when ``values`` is set).
    """

    source: str
    path: list[list[Any]]
    values: dict[str, Any] | None
    why: str = ""


def source_paths(section: Mapping[str, Any], layers_of: Callable[[str], int]) -> list[SourcePath]:
    """The own path of each source ``dataflow.start`` names, with its point of the space.

    Args:
        section: the section, checked against the models (study sources resolved; ``params`` set
            by :func:`~evomerge.dataflow.slots.check_section` where ``max_params`` caps paths).
        layers_of: a model reference's layer count.

    Returns:
        One :class:`SourcePath` per source named, in the sources' order.

    Example:
        >>> section = {"sources": [{"name": "a", "model": "m", "kind": "model", "layers": None}],
        ...            "repeats": 1, "slots": None, "layout": "flat", "use": None, "scale": 1.0,
        ...            "first": "fixed", "last": "free", "max_depth": None, "max_params": None,
        ...            "dtype": None, "start": "sources"}
        >>> p = source_paths(section, lambda ref: 2)[0]
        >>> p.path, p.values
        ([['a', 0, 1.0], ['a', 1, 1.0]], {'use.r0.a.1': 1.0})
    """
    start = section.get("start", START[0])
    if start == "none":
        return []
    out = []
    for s in section["sources"]:
        if start == "merges" and s["kind"] == "model":
            continue
        n = source_layers(s, layers_of)
        lo, hi = s["layers"] if s["layers"] is not None else (0, n)
        path = [[s["name"], layer, 1.0] for layer in range(lo, hi)]
        values, why = _point(section, layers_of, s["name"], path)
        out.append(SourcePath(s["name"], path, values, why))
    return out


def _one(scale: Any) -> tuple[Any, str]:
    """Scale 1 as ``dataflow.scale`` samples it, or why it cannot."""
    if isinstance(scale, float):
        return (1.0, "") if scale == 1.0 else (None, f"dataflow.scale is fixed at {scale:g}")
    if scale.kind == "choice":
        ones = [c for c in scale.choices if c == 1]
        return (ones[0], "") if ones else (None, "dataflow.scale's choices leave out 1")
    if not scale.contains(1):
        return None, f"dataflow.scale's range [{scale.low:g}, {scale.high:g}] leaves out 1"
    return (1 if scale.kind == "int" else 1.0), ""


def _point(
    section: Mapping[str, Any],
    layers_of: Callable[[str], int],
    name: str,
    path: list[list[Any]],
) -> tuple[dict[str, Any] | None, str]:
    one, why = _one(section["scale"])
    if why:
        return None, why
    seq = sequence(section, layers_of)
    last = len(seq) - 1
    first_fixed, last_fixed = section["first"] == "fixed", section["last"] == "fixed"
    searched = searched_slots(section, len(seq))
    # The earliest slots that run the path's layers in order (the earliest match leaves the most
    # room for the layers after it); a fixed slot is on, so it must be the first or last step.
    chosen: list[int] = []
    for j, (_, layer, _) in enumerate(path):
        if j == 0 and first_fixed:
            ks: list[int] = [0]
        elif j == len(path) - 1 and last_fixed:
            ks = [last]
        else:
            lo = chosen[-1] + 1 if chosen else 0
            ks = [k for k in range(lo, last + 1 - last_fixed) if k in searched]
        k = next((k for k in ks if seq[k][1:] == (name, layer) and k not in chosen), None)
        if k is None:
            end = (
                0 if j == 0 and first_fixed else last if j == len(path) - 1 and last_fixed else None
            )
            if end is None:
                return (
                    None,
                    f"dataflow.slots leaves no slot for its layer {layer} after the ones before",
                )
            r, src, lyr = seq[end]
            which = "first" if end == 0 else "last"
            return None, f"{which}: fixed keeps slot {end} (r{r}.{src}.{lyr}) on"
        chosen.append(k)
    if first_fixed and last_fixed and len(path) == 1 and last != 0:
        return None, f"first and last: fixed keep slots 0 and {last} on"
    on = set(chosen)
    flat, fixed_scale = section["layout"] == "flat", isinstance(section["scale"], float)
    values: dict[str, Any] = {}
    for k, (r, src, lyr) in enumerate(seq):
        tag = f"r{r}.{src}.{lyr}"
        always_on = (k == 0 and first_fixed) or (k == last and last_fixed)  # no use. parameter
        if not always_on:
            if k not in searched:
                continue
            values[f"use.{tag}"] = (1.0 if k in on else 0.0) if flat else (k in on)
        if not fixed_scale and (k in on or flat):
            values[f"scale.{tag}"] = one
    rendered = render_dataflow(section, lambda p, d: values[p], layers_of)["path"]
    if rendered != path:  # cut: max_depth, or max_params
        cap = "max_depth" if len(rendered) == section["max_depth"] else "max_params"
        return None, f"its {len(path)} steps are more than dataflow.{cap} allows ({len(rendered)})"
    return values, ""

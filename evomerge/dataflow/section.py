"""The ``dataflow:`` section of a search space: a data-flow search (Sakana's DFS).

The sources' layers in order, repeated ``repeats`` times, are the *slots*; a candidate is the slots
that are on, in order, each with the scale of its input::

    dataflow:
      sources:                                  # the layer sequence: each source's layers in order
        - zoo:demo/rot
        - {model: zoo:demo/sort, layers: [0, 4]}  # a layer range [start, end) of a source
        - {name: ps, recipe: ps_best.yml}       # a merge recipe (a file or a mapping)
        - {name: ps, study: demo.yml}           # the best trial of a finished study (PS+DFS)
      repeats: 2                                # T = repeats x the layers above: slots 0..T-1
      slots: [[0, 12], 20]                      # slots that may take part (default: every slot)
      scale: {range: [0.5, 2.0], log: true}     # each step's input scale (a number: fixed)
      first: fixed                              # slot 0 always on (default: free)
      last: fixed                               # slot T-1 always on (default: free)
      max_depth: 12                             # at most 12 steps
      max_params: 3.0e6                         # at most this many parameters
      layout: structured                        # structured | flat (see below)
      dtype: float32                            # the model's dtype (default: the first source's)
      start: merges                             # merges | sources | none (see below)

``layout: structured`` samples a slot's on/off as a choice and its scale only when it is on (TPE
models such conditional parameters); ``flat`` samples every slot's on/off as a number in [0, 1] (on
above 0.5) and every scale, a fixed-length vector of numbers as CMA-ES needs. A path longer than
``max_depth`` (or than ``max_params`` allows) keeps its first steps, and the last slot when ``last``
is fixed. ``start`` names the sources whose own paths (their layers in order, scales 1) the
search queues as its first trials (:mod:`evomerge.dataflow.start`): the merge sources (default),
every source, or none. Parameter names: ``use.r<repeat>.<source>.<layer>`` and ``scale.r<repeat>.<source>.<layer>``.

A study source is resolved when a search starts (:func:`with_study_recipe`); the rest is checked
against the opened models then (:func:`evomerge.dataflow.slots.check_section`): layer ranges,
hidden sizes, vocabularies. Rendering a point is :func:`evomerge.dataflow.slots.render_dataflow`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from evomerge.dtypes import torch_dtype
from evomerge.errors import did_you_mean
from evomerge.io import read_yaml
from evomerge.recipe.schema import parse_recipe

__all__ = [
    "DATAFLOW_KEYS",
    "START",
    "dataflow_section",
    "section_model_refs",
    "plain_sources",
    "recipe_refs",
    "recipe_sources",
    "study_sources",
    "with_study_recipe",
]

DATAFLOW_KEYS = (
    "sources",
    "repeats",
    "slots",
    "scale",
    "first",
    "last",
    "max_depth",
    "max_params",
    "layout",
    "dtype",
    "start",
)
START = ("merges", "sources", "none")  # dataflow.start (the first is the default)
_SOURCE_KEYS = ("model", "recipe", "study", "name", "layers", "trial", "storage")
_LAYOUTS = ("structured", "flat")
Suggest = Callable[[str, Any], Any]


def _short(ref: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9_]+", "_", ref.rstrip("/").split("/")[-1].split(":")[-1]).strip("_")
        or "model"
    )


def _positive_int(p: Any, v: Any, fld: str, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise p.err(fld, f"must be a whole number >= 1 ({what}), got {v!r}")
    return v


def dataflow_section(p: Any, v: Any) -> dict[str, Any]:
    """The section with its directives, checked as far as it can be without opening models.

    Args:
        p: the space parser (``err``, ``directive``, ``file``).
        v: the section as read.

    Returns:
        The section's tree: ``sources`` (a list of mappings with ``name`` and one of ``model``,
        ``recipe``, ``study``), ``repeats``, ``slots``, ``use`` and ``scale`` (directives, or a fixed
        scale), ``first``, ``last``, ``max_depth``, ``max_params``, ``layout``, ``dtype``, ``start``.

    Raises:
        ConfigError: naming the field, for every mistake listed in the module docstring.
    """
    if not isinstance(v, Mapping):
        raise p.err("dataflow", f"must be a mapping with keys {', '.join(DATAFLOW_KEYS)}")
    for k in v:
        if k not in DATAFLOW_KEYS:
            raise p.err(f"dataflow.{k}", f"unknown key{did_you_mean(str(k), DATAFLOW_KEYS)}")
    out: dict[str, Any] = {"sources": _sources(p, v.get("sources"))}
    out["repeats"] = _positive_int(
        p, v.get("repeats", 1), "dataflow.repeats", "times the layer sequence is repeated"
    )
    out["slots"] = _slots(p, v.get("slots"))
    layout = v.get("layout", "structured")
    if layout not in _LAYOUTS:
        raise p.err(
            "dataflow.layout", f"unknown layout {layout!r}{did_you_mean(str(layout), _LAYOUTS)}"
        )
    out["layout"] = layout
    out["use"] = (
        p.directive({"choice": [True, False]}, "dataflow.slots", "use")
        if layout == "structured"
        else p.directive({"range": [0.0, 1.0]}, "dataflow.slots", "use")
    )
    out["scale"] = _scale(p, v.get("scale", {"range": [0.5, 2.0], "log": True}))
    for end in ("first", "last"):
        val = v.get(end, "free")
        if val not in ("fixed", "free"):
            raise p.err(f"dataflow.{end}", f"must be fixed or free, got {val!r}")
        out[end] = val
    depth = v.get("max_depth")
    out["max_depth"] = (
        None if depth is None else _positive_int(p, depth, "dataflow.max_depth", "steps of a path")
    )
    params = v.get("max_params")
    if params is not None and (
        isinstance(params, bool) or not isinstance(params, (int, float)) or params <= 0
    ):
        raise p.err(
            "dataflow.max_params", f"must be a number of parameters above 0, got {params!r}"
        )
    out["max_params"] = None if params is None else int(params)
    dtype = v.get("dtype")
    if dtype is not None:
        try:
            torch_dtype(str(dtype))
        except Exception:
            raise p.err(
                "dataflow.dtype", f"unknown dtype {dtype!r} (float32, bfloat16, float16)"
            ) from None
    out["dtype"] = dtype
    start = v.get("start", START[0])
    if start not in START:
        raise p.err(
            "dataflow.start",
            f"unknown value {start!r}{did_you_mean(str(start), START)}: the sources whose own paths are the first trials",
        )
    out["start"] = start
    return out


def _sources(p: Any, raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise p.err(
            "dataflow.sources", "must be a non-empty list of models, {recipe: ...} or {study: ...}"
        )
    out = []
    for i, s in enumerate(raw):
        fld = f"dataflow.sources[{i}]"
        if isinstance(s, str):
            s = {"model": s}
        if not isinstance(s, Mapping):
            raise p.err(
                fld,
                f"must be a model reference or a mapping with model, recipe or study, got {s!r}",
            )
        for k in s:
            if k not in _SOURCE_KEYS:
                raise p.err(f"{fld}.{k}", f"unknown key{did_you_mean(str(k), _SOURCE_KEYS)}")
        kinds = [k for k in ("model", "recipe", "study") if k in s]
        if len(kinds) != 1:
            raise p.err(
                fld,
                "needs exactly one of model: (a reference), recipe: (a merge) or study: (a space file whose study is finished)",
            )
        kind = kinds[0]
        e: dict[str, Any] = {"kind": kind}
        if kind == "model":
            if not isinstance(s["model"], str) or not s["model"]:
                raise p.err(f"{fld}.model", f"must be a model reference, got {s['model']!r}")
            e["model"] = s["model"]
        elif kind == "recipe":
            recipe = s["recipe"]
            if isinstance(recipe, str):
                path = _relative(p.file, recipe)
                if not path.is_file():
                    raise p.err(f"{fld}.recipe", f"recipe file {recipe!r} not found")
                recipe = read_yaml(path)
            if not isinstance(recipe, Mapping):
                raise p.err(f"{fld}.recipe", "must be a merge recipe mapping or a recipe file")
            parse_recipe(recipe, f"{p.file} ({fld}.recipe)")
            e["recipe"] = dict(recipe)
        else:
            study = s["study"]
            if not isinstance(study, str) or not study:
                raise p.err(
                    f"{fld}.study", f"must be the space file of a finished study, got {study!r}"
                )
            path = _relative(p.file, study)
            if not path.is_file():
                raise p.err(
                    f"{fld}.study",
                    f"space file {study!r} not found (the study's space: its study name and storage are read from it)",
                )
            e["study"] = str(path)
            trial = s.get("trial")
            if trial is not None and (
                isinstance(trial, bool) or not isinstance(trial, int) or trial < 0
            ):
                raise p.err(f"{fld}.trial", f"must be a trial number, got {trial!r}")
            e["trial"] = trial
            storage = s.get("storage")
            if storage is not None and not isinstance(storage, str):
                raise p.err(f"{fld}.storage", f"must be an Optuna storage URL, got {storage!r}")
            e["storage"] = storage
        for k in ("trial", "storage"):
            if k in s and kind != "study":
                raise p.err(f"{fld}.{k}", "belongs to a study: source")
        name = s.get("name")
        if name is None:
            name = (
                _short(s["model"])
                if kind == "model"
                else Path(e["study"]).stem
                if kind == "study"
                else f"recipe{i}"
            )
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise p.err(
                f"{fld}.name",
                f"must be a plain name (a letter, then letters, digits, _ -), got {name!r}",
            )
        e["name"] = name
        layers = s.get("layers")
        if layers is not None and not (
            isinstance(layers, list)
            and len(layers) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            and 0 <= layers[0] < layers[1]
        ):
            raise p.err(
                f"{fld}.layers",
                f"must be [start, end] with 0 <= start < end (layers start..end-1), got {layers!r}",
            )
        e["layers"] = layers
        out.append(e)
    names = [e["name"] for e in out]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise p.err(
                f"dataflow.sources[{i}].name",
                f"{n!r} names two sources; give each a name: of its own",
            )
    return out


def _relative(file: str, path: str) -> Path:
    q = Path(path).expanduser()
    return q if q.is_absolute() else Path(file).resolve().parent / q


def _slots(p: Any, raw: Any) -> list[int | list[int]] | None:
    if raw is None or raw == "all":
        return None
    if not isinstance(raw, list) or not raw:
        raise p.err(
            "dataflow.slots",
            "must be all or a non-empty list of slot numbers and [start, end] ranges: a path with no slot has no layers",
        )
    out: list[int | list[int]] = []
    for i, x in enumerate(raw):
        ok = (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (
            isinstance(x, list)
            and len(x) == 2
            and all(isinstance(y, int) and not isinstance(y, bool) for y in x)
            and 0 <= x[0] < x[1]
        )
        if not ok:
            raise p.err(
                f"dataflow.slots[{i}]",
                f"must be a slot number >= 0 or [start, end] with start < end, got {x!r}",
            )
        out.append(x)
    return out


def _scale(p: Any, raw: Any) -> Any:
    why = "the export folds 1/scale into the output projections, and RMSNorm ignores positive factors only"
    if isinstance(raw, Mapping):
        d = p.directive(raw, "dataflow.scale", "scale", numbers_only=True)
        if d.anchors or d.per_layers:
            raise p.err(
                "dataflow.scale",
                "takes range, int or choice: each slot has a scale of its own already",
            )
        values = d.choices if d.kind == "choice" else (d.low, d.high)
        if any(x <= 0 for x in values):
            kind = "choice" if d.kind == "choice" else "range" if d.kind == "float" else "int"
            raise p.err(f"dataflow.scale.{kind}", f"must be above 0 ({why}), got {list(values)!r}")
        return d
    if (
        isinstance(raw, bool)
        or not isinstance(raw, (int, float))
        or not math.isfinite(raw)
        or raw <= 0
    ):
        raise p.err(
            "dataflow.scale", f"must be a number above 0 or a directive ({why}), got {raw!r}"
        )
    return float(raw)


# ----------------------------------------------------------------------------- sources


def plain_sources(section: Mapping[str, Any]) -> list[str]:
    """The model references among the sources."""
    return [s["model"] for s in section["sources"] if "model" in s]


def recipe_sources(section: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, recipe)`` of each merge source (a study source once resolved)."""
    return [(s["name"], s["recipe"]) for s in section["sources"] if "recipe" in s]


def study_sources(section: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(index, source)`` of each study source (resolved or not)."""
    return [(i, s) for i, s in enumerate(section["sources"]) if s["kind"] == "study"]


def with_study_recipe(
    section: Mapping[str, Any], index: int, recipe: Mapping[str, Any], trial: int
) -> dict[str, Any]:
    """The section with study source ``index`` resolved: its trial and that trial's recipe."""
    sources = list(section["sources"])
    sources[index] = {**sources[index], "recipe": dict(recipe), "resolved_trial": trial}
    return {**section, "sources": sources}


def section_model_refs(section: Any) -> list[str]:
    """Every model the section reads: plain sources and the models of merge sources."""
    out: list[str] = []
    if not isinstance(section, Mapping):
        return out
    for s in section.get("sources") or ():
        if "model" in s:
            out.append(s["model"])
        recipe = s.get("recipe")
        if isinstance(recipe, Mapping):
            out += recipe_refs(recipe)
    return out


def recipe_refs(recipe: Mapping[str, Any]) -> list[str]:
    out = [recipe["base_model"]] if isinstance(recipe.get("base_model"), str) else []
    out += [
        m["model"]
        for m in recipe.get("models") or ()
        if isinstance(m, Mapping) and isinstance(m.get("model"), str)
    ]
    for sl in recipe.get("slices") or ():
        out += [
            s["model"]
            for s in (sl.get("sources") or ())
            if isinstance(s, Mapping) and isinstance(s.get("model"), str)
        ]
    return out

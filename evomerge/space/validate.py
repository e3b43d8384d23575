"""Checking a parsed space against the recipe schemas at points of it, so that mistakes are reported
when the space loads (naming the space file and the field) rather than by the trials that meet them:
one point per method (each directive at a corner of its range), then every other option of each
``choice``, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.methods.registry import get_method
from evomerge.recipe.schema import parse_recipe
from evomerge.space.directives import Directive, LayersOf
from evomerge.space.moe import validate_moe
from evomerge.space.space import Space

__all__ = ["validate_points", "check_layer_groups"]


def validate_points(space: Space) -> None:
    """Check the recipe part against the mergekit schema at one point of the space per method,
    so typos and unknown parameters are reported at load, naming the space file."""
    method_dir = space.tree.get("merge_method")
    methods = method_dir.choices if isinstance(method_dir, Directive) else (method_dir,)
    if isinstance(method_dir, Directive):
        known = {p.name for m in methods if m != "moe" for p in get_method(m).params}
        for fld, block in _param_blocks(space.tree):
            for k in block:
                if k not in known:
                    raise ConfigError(
                        space.file,
                        f"{fld}.{k}",
                        f"not a parameter of any method in merge_method.choice{did_you_mean(str(k), known, show_all=0)}; they take: {', '.join(sorted(known))}",
                    )
    for method in methods:
        used: dict[int, Directive] = {}  # by identity: a list's `in` compared dataclasses, n**2

        def suggest(
            name: str, d: Directive, _m: Any = method, _used: dict[int, Directive] = used
        ) -> Any:
            _used.setdefault(id(d), d)
            if d is method_dir:
                return _m
            if d.kind == "int" and d.path.endswith("layer_range[1]"):
                return int(d.high)
            if (
                d.kind == "choice"
            ):  # the first option: an optional expert's (True, False) takes part
                return d.choices[0]
            return int(d.low) if d.kind == "int" else d.low if d.log else (d.low + d.high) / 2

        _check_point(space, method, space.render(suggest, lambda ref: 8))
        _check_options(
            space,
            method,
            [d for d in used.values() if d.kind == "choice" and d is not method_dir],
            suggest,
        )


def _check_point(space: Space, method: Any, recipe: dict[str, Any]) -> None:
    if method == "moe":
        validate_moe(space.file, recipe)
    else:
        parse_recipe(recipe, space.file)


def _check_options(space: Space, method: Any, choices: list[Directive], corner: Any) -> None:
    """Check every other option of each ``choice`` (the rest of the space at its corner), so that an
    option no recipe takes (``gate_mode: {choice: [hidden, hiden]}``, a dtype typo) is reported at
    load instead of failing the trials that pick it. An error that names another field (two
    choices of the same expert model, say) is left to the trial that meets it."""
    for d in choices:
        for option in d.choices[1:]:

            def suggest(name: str, x: Directive, _d: Directive = d, _o: Any = option) -> Any:
                return _o if x is _d else corner(name, x)

            try:
                _check_point(space, method, space.render(suggest, lambda ref: 8))
            except ConfigError as err:
                fld = err.field or ""
                if fld and (d.path == fld or d.path.endswith("." + fld)):
                    raise ConfigError(
                        space.file, f"{d.path}.choice", f"option {option!r}: {err.message}"
                    ) from None


def _param_blocks(tree: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(tree.get("parameters"), Mapping):
        yield "parameters", tree["parameters"]
    for i, m in enumerate(tree.get("models") or ()):
        if isinstance(m, Mapping) and isinstance(m.get("parameters"), Mapping):
            yield f"models[{i}].parameters", m["parameters"]
    for i, s in enumerate(tree.get("slices") or ()):
        if not isinstance(s, Mapping):
            continue
        if isinstance(s.get("parameters"), Mapping):
            yield f"slices[{i}].parameters", s["parameters"]
        for j, src in enumerate(s.get("sources") or ()):
            if isinstance(src, Mapping) and isinstance(src.get("parameters"), Mapping):
                yield f"slices[{i}].sources[{j}].parameters", src["parameters"]


def check_layer_groups(space: Space, layers_of: LayersOf) -> None:
    """Check each ``per_layers`` against the layers it groups, once the models are open: a group
    larger than the model (or the slice) would search one value for all its layers.

    Args:
        space: the parsed space.
        layers_of: the number of layers of a model reference.

    Raises:
        ConfigError: names the directive's ``per_layers`` field, the group size and the layer count.
    """
    _check_groups(space.file, space.tree, layers_of)
    moe = space.tree.get("moe")
    for e in (moe.get("experts") or ()) if isinstance(moe, Mapping) else ():
        src = e.get("source_model") if isinstance(e, Mapping) else None
        if isinstance(src, Mapping):  # a merged expert: a recipe tree of its own
            _check_groups(space.file, src, layers_of)


def _refs(v: Any) -> list[str]:
    if isinstance(v, Directive):
        return [c for c in v.choices if isinstance(c, str)]
    return [v] if isinstance(v, str) else []


def _grouped(block: Any) -> Iterator[Directive]:
    """The ``per_layers`` directives in a parameters block (plain, in lists, in {filter, value})."""
    if isinstance(block, Directive) and block.per_layers:
        yield block
    elif isinstance(block, (Mapping, list)):
        for v in block.values() if isinstance(block, Mapping) else block:
            yield from _grouped(v)


def _check_groups(file: str, tree: Mapping[str, Any], layers_of: LayersOf) -> None:
    # The layer counts the renderer (evomerge.space.render) gives each block: a models: entry and
    # the global parameters count the base model's layers (the entry's own model without a base);
    # a slice counts its layer_range (searched ranges vary by point and are left alone).
    base = _refs(tree.get("base_model"))
    models = [m for m in tree.get("models") or () if isinstance(m, Mapping)]
    for m in models:
        _check_block(file, m.get("parameters"), base or _refs(m.get("model")), layers_of)
    if models and "slices" not in tree:
        _check_block(file, tree.get("parameters"), base or _refs(models[0].get("model")), layers_of)
    for s in tree.get("slices") or ():
        if not isinstance(s, Mapping):
            continue
        n: tuple[int, str] | None = None
        for src in s.get("sources") or ():
            lr = src.get("layer_range") if isinstance(src, Mapping) else None
            if isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr):
                n = (lr[1] - lr[0], f"the slice's layer_range {lr}")
            elif isinstance(lr, list):
                n = None  # searched
        blocks = [s.get("parameters")] + [
            src.get("parameters") for src in s.get("sources") or () if isinstance(src, Mapping)
        ]
        if n is None or n[0] <= 0:
            continue
        for block in blocks:
            for d in _grouped(block):
                _refuse_group(file, d, *n)


def _check_block(file: str, block: Any, refs: list[str], layers_of: LayersOf) -> None:
    for d in _grouped(block):
        for ref in refs:
            _refuse_group(file, d, layers_of(ref), f"model {ref}")


def _refuse_group(file: str, d: Directive, n_layers: int, what: str) -> None:
    if d.per_layers is not None and d.per_layers > n_layers:
        raise ConfigError(
            file,
            f"{d.path}.per_layers",
            f"{d.per_layers} is more than the {n_layers} layers of {what} (one group would cover every layer); "
            f"allowed: 1 to {n_layers}",
        )

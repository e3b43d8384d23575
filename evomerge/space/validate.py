"""Checking a parsed space against the recipe schemas at points of it, so that mistakes are reported
when the space loads (naming the space file and the field) rather than by the trials that meet them:
one point per method (each directive at a corner of its range), then every other option of each
``choice``, one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.methods.registry import get_method
from evomerge.recipe.schema import parse_recipe
from evomerge.space.directives import Directive
from evomerge.space.moe import validate_moe
from evomerge.space.space import Space

__all__ = ["validate_points"]


def _corner(d: Directive) -> Any:
    if d.kind == "choice":
        return d.choices[0]
    if d.kind == "int":
        return int(d.low)
    return d.low if d.log else (d.low + d.high) / 2


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
        used: list[Directive] = []

        def suggest(
            name: str, d: Directive, _m: Any = method, _used: list[Directive] = used
        ) -> Any:
            if d not in _used:
                _used.append(d)
            if d is method_dir:
                return _m
            if d.kind == "int" and d.path.endswith("layer_range[1]"):
                return int(d.high)
            if d.kind == "choice" and d.choices == (True, False):
                return True  # an optional expert takes part
            return _corner(d)

        _check_point(space, method, space.render(suggest, lambda ref: 8))
        _check_options(
            space, method, [d for d in used if d.kind == "choice" and d is not method_dir], suggest
        )


def _check_point(space: Space, method: Any, recipe: dict[str, Any]) -> None:
    if method == "moe":
        validate_moe(space.file, recipe)
    else:
        parse_recipe(_with_raw_params(space, recipe), space.file)


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


def _param_blocks(tree: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    out = []
    if isinstance(tree.get("parameters"), Mapping):
        out.append(("parameters", tree["parameters"]))
    for i, m in enumerate(tree.get("models") or ()):
        if isinstance(m, Mapping) and isinstance(m.get("parameters"), Mapping):
            out.append((f"models[{i}].parameters", m["parameters"]))
    for i, s in enumerate(tree.get("slices") or ()):
        if not isinstance(s, Mapping):
            continue
        if isinstance(s.get("parameters"), Mapping):
            out.append((f"slices[{i}].parameters", s["parameters"]))
        for j, src in enumerate(s.get("sources") or ()):
            if isinstance(src, Mapping) and isinstance(src.get("parameters"), Mapping):
                out.append((f"slices[{i}].sources[{j}].parameters", src["parameters"]))
    return out


def _with_raw_params(space: Space, recipe: dict[str, Any]) -> dict[str, Any]:
    """For schema checks, keep parameters the chosen method does not declare (so a typo such as
    ``wieght`` is reported instead of silently dropped) unless the method is itself searched."""
    if isinstance(space.tree.get("merge_method"), Directive):
        return recipe
    out = dict(recipe)
    if "parameters" in space.tree:
        out["parameters"] = {
            **{k: 0 for k in space.tree["parameters"]},
            **(recipe.get("parameters") or {}),
        }
    if "models" in space.tree and "models" in recipe:
        models = []
        for m, r in zip(space.tree["models"], recipe["models"], strict=False):
            r = dict(r)
            if isinstance(m, Mapping) and isinstance(m.get("parameters"), Mapping):
                extra = {k: 0 for k in m["parameters"] if k not in (r.get("parameters") or {})}
                if extra:
                    r["parameters"] = {**(r.get("parameters") or {}), **extra}
            models.append(r)
        out["models"] = models
    return out

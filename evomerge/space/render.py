"""Rendering a space at a point (a plain recipe), and reading the point back off a hand recipe."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from evomerge.dataflow.slots import render_dataflow
from evomerge.methods.registry import METHODS, get_method
from evomerge.space.directives import Directive, LayersOf, Suggest
from evomerge.space.moe import Prompts, render_moe

__all__ = ["render", "values_of", "UNUSED"]

# Parameters a method accepts (as mergekit does) but never reads: not worth a search dimension.
UNUSED = {"task_arithmetic": frozenset({"density"})}
_TOP_KEYS = ("base_model", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")


class _NotInSpace(Exception):
    pass


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = {k for k in a if a[k] is not None} | {k for k in b if b[k] is not None}
        return all(_same(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _collect(
    tree: Any,
    recipe: Any,
    found: dict[str, Any],
    layers_of: LayersOf,
    n_layers: int | None = None,
) -> None:
    """Read directive values off a concrete recipe that has the space's shape."""
    if isinstance(tree, Directive):
        names = tree.names(n_layers)
        if tree.anchors or tree.per_layers:
            if not isinstance(recipe, (list, tuple)):
                raise _NotInSpace
            if tree.anchors:
                vals = list(recipe)
            else:
                g = tree.per_layers or 1
                vals = [recipe[min(i * g, len(recipe) - 1)] for i in range(len(names))]
            if len(vals) != len(names):
                raise _NotInSpace
        else:
            vals = [recipe]
        for n, v in zip(names, vals, strict=False):
            if not tree.contains(v):
                raise _NotInSpace
            found[n] = v
        return
    if isinstance(tree, Mapping):
        if not isinstance(recipe, Mapping):
            raise _NotInSpace
        hint = n_layers  # a recipe's models and parameters count its first model's layers
        if "merge_method" in tree and ({"models", "parameters"} & set(tree) & set(recipe)):
            ref = recipe.get("base_model") or next(
                (m.get("model") for m in recipe.get("models") or ()), None
            )
            if isinstance(ref, str):
                try:
                    hint = layers_of(ref)
                except Exception:
                    hint = None
        for k, v in tree.items():
            if k in recipe:
                below = hint if k in ("models", "parameters") else n_layers
                _collect(v, recipe[k], found, layers_of, below)
        return
    if isinstance(tree, list):
        if not isinstance(recipe, (list, tuple)) or len(recipe) != len(tree):
            raise _NotInSpace
        for x, y in zip(tree, recipe, strict=False):
            _collect(x, y, found, layers_of, n_layers)


class _Renderer:
    def __init__(
        self, tree: Mapping[str, Any], suggest: Suggest, layers_of: LayersOf, prompts: Prompts
    ) -> None:
        self.tree, self.suggest, self.layers_of, self.prompts = tree, suggest, layers_of, prompts

    def value(self, v: Any, n_layers: int | None = None) -> Any:
        if isinstance(v, Directive):
            names = v.names(n_layers)
            vals = [self.suggest(n, v) for n in names]
            if v.anchors:
                return vals
            if v.per_layers:
                n = n_layers or v.per_layers
                return [vals[i // v.per_layers] for i in range(n)]
            return vals[0]
        if isinstance(v, Mapping):
            return {k: self.value(x, n_layers) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x, n_layers) for x in v]
        return v

    def params(self, block: Any, method: str, scopes: tuple[str, ...], n_layers: int | None) -> Any:
        if not isinstance(block, Mapping):
            return self.value(block, n_layers)
        chosen = isinstance(self.tree.get("merge_method"), Directive)
        decl = (
            {p.name: p for p in get_method(method).params} if chosen and method in METHODS else None
        )
        out = {}
        for k, v in block.items():
            if decl is not None and (
                k not in decl or decl[k].scope not in scopes or k in UNUSED.get(method, ())
            ):
                continue  # not a parameter of the chosen method: neither sampled nor written
            out[k] = self.value(v, n_layers)
        return out

    def recipe(self) -> dict[str, Any]:
        tree = self.tree
        if "dataflow" in tree:  # a data-flow candidate (the space holds nothing else)
            return render_dataflow(tree["dataflow"], self.suggest, self.layers_of)
        out: dict[str, Any] = {}
        method = self.value(tree.get("merge_method"))
        if method == "moe" and "moe" in tree:
            return render_moe(tree, self.value, self._expert_recipe, self.prompts)
        out["merge_method"] = method
        for k in _TOP_KEYS:
            if k in tree:
                out[k] = self.value(tree[k])
        base = out.get("base_model")
        shared = ("shared",)
        per_model = ("input", "non_base")
        if "models" in tree:
            first = base if isinstance(base, str) else None
            models = []
            for m in tree["models"]:
                ref = self.value(m.get("model"))
                n = self._layers(first or ref)
                entry = {"model": ref}
                if "parameters" in m:
                    entry["parameters"] = self.params(m["parameters"], method, per_model, n)
                    if not entry["parameters"]:
                        del entry["parameters"]
                models.append(entry)
            out["models"] = models
            n_global = self._layers(first or models[0]["model"]) if models else None
        if "slices" in tree:
            slices = []
            for s in tree["slices"]:
                sl: dict[str, Any] = {}
                srcs = []
                n_slice = None
                for src in s.get("sources") or ():
                    e: dict[str, Any] = {"model": self.value(src.get("model"))}
                    if "layer_range" in src:
                        lr = self.value(src["layer_range"])
                        e["layer_range"] = lr
                        if (
                            isinstance(lr, list)
                            and len(lr) == 2
                            and all(isinstance(x, int) for x in lr)
                        ):
                            n_slice = lr[1] - lr[0]
                    srcs.append(e)
                for e, src in zip(srcs, s.get("sources") or (), strict=False):
                    if "parameters" in src:
                        e["parameters"] = self.params(src["parameters"], method, per_model, n_slice)
                sl["sources"] = srcs
                for k in s:
                    if k == "parameters":
                        sl[k] = self.params(s[k], method, shared + per_model, n_slice)
                    elif k != "sources":
                        sl[k] = self.value(s[k])
                slices.append(sl)
            out["slices"] = slices
            n_global = None
        if "modules" in tree:  # holds no directive (parse_space refuses them there)
            out["modules"] = tree["modules"]
            n_global = None
        if "parameters" in tree:
            p = self.params(tree["parameters"], method, shared + per_model, n_global)
            if p:
                out["parameters"] = p
        return out

    def _layers(self, ref: Any) -> int | None:
        return self.layers_of(ref) if isinstance(ref, str) else None

    def _expert_recipe(self, tree: Mapping[str, Any]) -> dict[str, Any]:
        """A merged expert's recipe (a recipe tree inside the ``moe:`` section)."""
        return _Renderer(dict(tree), self.suggest, self.layers_of, self.prompts).recipe()


def render(
    tree: Mapping[str, Any], suggest: Suggest, layers_of: LayersOf, prompts: Prompts = None
) -> dict[str, Any]:
    """The plain recipe of a space's ``tree`` at the point ``suggest`` picks (see
    :meth:`~evomerge.space.space.Space.render`)."""
    return _Renderer(tree, suggest, layers_of, prompts).recipe()


def values_of(
    tree: Mapping[str, Any], recipe: Mapping[str, Any], layers_of: LayersOf
) -> dict[str, Any] | None:
    """The parameter values that render to ``recipe``, or None (see :meth:`Space.values_of`)."""
    found: dict[str, Any] = {}
    try:
        _collect(tree, recipe, found, layers_of)
        rendered = render(tree, lambda name, d: found[name], layers_of)  # KeyError: not in space
    except (_NotInSpace, KeyError, TypeError, IndexError):
        return None
    return found if _same(rendered, recipe) else None

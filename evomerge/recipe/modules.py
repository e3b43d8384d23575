"""mergekit's multi-module recipes (``modules:``), read as the one recipe they amount to.

mergekit 0.1.5 plans a model as named modules (``default`` for a causal LM; a vision-language model
inferred from its tensors has one per layer stack plus ``default`` for the rest), and
``MergeConfiguration.to_yaml()`` writes what it planned in that form::

    modules:
      default:
        slices:
          - sources:
              - {model: a, layer_range: [0, 32], parameters: {weight: 0.6}}
              - {model: b, layer_range: [0, 32], parameters: {weight: 0.4}}
        parameters: {normalize: true}

A module's ``parameters`` sit between the recipe's and a slice's in precedence (a name set in the
module wins over the recipe's). Accepted here:

- **one module** (``default``, ``text_decoder``; not a vision or audio module alone): its
  ``models:`` or ``slices:`` become the recipe's, its parameters are merged over the recipe's;
- **several modules that merge alike** (the same models with the same parameters, the same module
  and slice parameters, one slice each from layer 0; mergekit writes this for a ``models:`` recipe
  of a vision-language model): a ``models:`` recipe over every tensor. Each module's ``layer_range``
  end is kept in :attr:`MergeConfig.module_spans` so that the planner can check it covers a whole
  layer stack (``[0, 0]`` for the tensors outside any stack).

Modules that merge differently (one model's vision tower, a blend of language models) are refused
with a line that says how to write the recipe with ``models:`` or ``slices:``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from evomerge.errors import ConfigError, did_you_mean

__all__ = ["flatten_modules", "MODULE_KEYS", "OTHER_MODULE_HINTS"]

MODULE_KEYS = ("slices", "models", "parameters")
# Words in the names of a model's parts other than its language model (module names here, tensor
# prefixes in evomerge.engine.arch).
OTHER_MODULE_HINTS = ("vision", "visual", "image", "audio", "speech", "projector")
_REWRITE = "evomerge merges one recipe over every tensor: write it with models: (every part merged alike) or slices: (the language model's layers, the other parts from the first slice's models)"


def flatten_modules(
    data: Mapping[str, Any], file: str | None
) -> tuple[dict[str, Any], str, tuple[tuple[str, int], ...]]:
    """The ``models:``/``slices:`` recipe a ``modules:`` recipe amounts to.

    Args:
        data: the recipe mapping, with ``modules``.
        file: the recipe file, for messages.

    Returns:
        ``(recipe mapping without modules, field prefix for messages, module spans)``; the spans
        ``(module, layer_range end)`` are given for several modules, else empty.

    Raises:
        ConfigError: a malformed module, or modules that merge differently.

    Example:
        >>> r, where, spans = flatten_modules({"merge_method": "linear", "parameters": {"normalize": False},
        ...     "modules": {"default": {"models": [{"model": "a"}], "parameters": {"normalize": True}}}}, None)
        >>> r["models"], r["parameters"], where
        ([{'model': 'a'}], {'normalize': True}, 'modules.default.')
    """
    modules = data["modules"]
    if not isinstance(modules, Mapping) or not modules:
        raise ConfigError(
            file,
            "modules",
            "must be a non-empty mapping of module names to {models or slices, parameters}",
        )
    for key in ("models", "slices"):
        if data.get(key) is not None:
            raise ConfigError(file, key, "give exactly one of models:, slices: or modules:")
    rest = {k: v for k, v in data.items() if k != "modules"}
    parts: list[tuple[str, Mapping[str, Any]]] = []
    for name, module in modules.items():
        where = f"modules.{name}"
        if not isinstance(module, Mapping):
            raise ConfigError(
                file,
                where,
                f"must be a mapping with keys {', '.join(MODULE_KEYS)}, got {type(module).__name__}",
            )
        unknown = [k for k in module if k not in MODULE_KEYS]
        if unknown:
            raise ConfigError(
                file,
                f"{where}.{unknown[0]}",
                f"unknown key{did_you_mean(str(unknown[0]), MODULE_KEYS)}",
            )
        if (module.get("models") is None) == (module.get("slices") is None):
            raise ConfigError(file, where, "give exactly one of models: or slices:")
        parts.append((str(name), module))
    if len(parts) == 1:
        name, module = parts[0]
        if any(h in name.lower() for h in OTHER_MODULE_HINTS):
            raise ConfigError(
                file,
                f"modules.{name}",
                f"a recipe of the {name} module alone would slice the language model's layers; {_REWRITE}",
            )
        out = rest | {k: module[k] for k in ("models", "slices") if module.get(k) is not None}
        out["parameters"] = _over(
            rest.get("parameters"), module.get("parameters"), file, f"modules.{name}.parameters"
        )
        return out, f"modules.{name}.", ()
    return _alike(rest, parts, file)


def _over(low: Any, high: Any, file: str | None, where: str) -> dict[str, Any]:
    if high is not None and not isinstance(high, Mapping):
        raise ConfigError(
            file,
            where,
            f"must be a mapping of parameter names to values, got {type(high).__name__}",
        )
    return {**(low if isinstance(low, Mapping) else {}), **(high or {})}


def _alike(
    rest: dict[str, Any], parts: list[tuple[str, Mapping[str, Any]]], file: str | None
) -> tuple[dict[str, Any], str, tuple[tuple[str, int], ...]]:
    """Several modules: accepted when each is the same merge of the same models (one slice from layer 0)."""
    shapes: list[tuple[str, str]] = []
    spans: list[tuple[str, int]] = []
    base: Any = None
    for name, module in parts:
        where = f"modules.{name}"
        params = module.get("parameters")
        if module.get("models") is not None:
            models = module["models"]
            if not isinstance(models, list) or not models:
                raise ConfigError(
                    file, f"{where}.models", "must be a non-empty list of {model, parameters}"
                )
            inputs = [
                {"model": m.get("model"), "parameters": m.get("parameters") or {}}
                if isinstance(m, Mapping)
                else m
                for m in models
            ]
        else:
            slices = module["slices"]
            if (
                not isinstance(slices, list)
                or len(slices) != 1
                or not isinstance(slices[0], Mapping)
            ):
                raise ConfigError(
                    file,
                    f"{where}.slices",
                    f"several modules with several slices each are not supported; {_REWRITE}",
                )
            s = slices[0]
            sources = s.get("sources")
            if (
                not isinstance(sources, list)
                or not sources
                or not all(isinstance(x, Mapping) for x in sources)
            ):
                raise ConfigError(
                    file,
                    f"{where}.slices[0].sources",
                    "must be a non-empty list of {model, layer_range}",
                )
            ranges = {json.dumps(x.get("layer_range")) for x in sources}
            lr = sources[0].get("layer_range")
            if (
                len(ranges) != 1
                or not (
                    isinstance(lr, list)
                    and len(lr) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                )
                or lr[0] != 0
                or lr[1] < 0
            ):
                raise ConfigError(
                    file,
                    f"{where}.slices[0].sources",
                    f"each source must take layer_range [0, n] with the same n, got {sorted(ranges)}; {_REWRITE}",
                )
            spans.append((name, lr[1]))
            inputs = [
                {"model": x.get("model"), "parameters": x.get("parameters") or {}} for x in sources
            ]
            params = _over(params, s.get("parameters"), file, f"{where}.slices[0].parameters")
            if s.get("base_model") is not None:
                if base is not None and s["base_model"] != base:
                    raise ConfigError(
                        file,
                        f"{where}.slices[0].base_model",
                        f"modules name different base models; {_REWRITE}",
                    )
                base = s["base_model"]
        shapes.append((name, json.dumps([inputs, params or {}], sort_keys=True)))
    differing = [n for n, s in shapes if s != shapes[0][1]]
    if differing:
        raise ConfigError(
            file,
            f"modules.{differing[0]}",
            f"merges other models or parameters than modules.{shapes[0][0]}; {_REWRITE}",
        )
    name, module = parts[0]
    first = json.loads(shapes[0][1])
    out = dict(rest)
    out["models"] = [
        {"model": x["model"], **({"parameters": x["parameters"]} if x["parameters"] else {})}
        for x in first[0]
    ]
    out["parameters"] = _over(rest.get("parameters"), first[1], file, f"modules.{name}.parameters")
    if base is not None:
        if rest.get("base_model") is not None and rest["base_model"] != base:
            raise ConfigError(
                file,
                "base_model",
                f"differs from the modules' slice base_model {base!r}; {_REWRITE}",
            )
        out["base_model"] = base
    return out, f"modules.{name}.", tuple(spans)

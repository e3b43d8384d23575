"""The merge recipe: mergekit's merge-configuration schema, validated strictly at load.

A recipe is exactly what ``mergekit-yaml`` reads::

    merge_method: ties
    base_model: mistralai/Mistral-7B-v0.1
    models:
      - model: OpenPipe/mistral-ft-optimized-1218
        parameters: {density: 0.5, weight: 0.5}
    parameters: {normalize: true}
    dtype: float16

Differences from mergekit are all refusals where mergekit guesses: unknown keys, unknown parameter
names, and parameters placed where they are never read are errors that name the field and what is
allowed, instead of being ignored. One exception: a parameter another method takes (a model's
``weight`` kept when ``merge_method`` is switched to slerp) is ignored with a one-line warning on
stderr when a recipe is loaded with :func:`load_recipe`, as mergekit ignores it. Parameter values
are checked against the method's declaration (:mod:`evomerge.methods.registry`) here, before any
model is opened. The validated recipe's data types live in :mod:`evomerge.recipe.config`.

A parameter *setting* is a scalar, a gradient (a list of scalars interpolated over a slice's
layers), a ``{filter, value}`` entry, or a list of such entries (the first whose filter is a
substring of the tensor name wins; an entry without a filter matches every tensor).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from evomerge.dtypes import canonical
from evomerge.errors import ConfigError, did_you_mean
from evomerge.io import dump_yaml, read_yaml
from evomerge.methods.registry import KNOWN_PARAMS, METHODS, NOT_METHODS
from evomerge.methods.spec import Method, Param
from evomerge.recipe.config import Cond, InputModel, MergeConfig, OutputSlice, Scalar, Setting
from evomerge.recipe.modules import flatten_modules

__all__ = [
    "Cond",
    "Setting",
    "InputModel",
    "OutputSlice",
    "MergeConfig",
    "load_recipe",
    "parse_recipe",
    "read_yaml",
    "dump_yaml",
]

# What to do with a parameter that another method takes and the recipe's method does not use.
Unused = Literal["warn", "error"]


def load_recipe(
    source: str | os.PathLike[str] | Mapping[str, Any], *, unused: Unused = "warn"
) -> MergeConfig:
    """Load and validate a mergekit recipe from a YAML file or a mapping.

    Args:
        source: path to a YAML file, or the already-parsed mapping.
        unused: what to do with a parameter that some other method takes but this one does not
            (mergekit ignores it): ``"warn"`` drops it and prints one line per place to stderr;
            ``"error"`` refuses the recipe.

    Returns:
        The validated :class:`MergeConfig`.

    Raises:
        ConfigError: naming the file, the field and what is allowed.

    Example:
        >>> cfg = load_recipe({"merge_method": "linear", "models": [
        ...     {"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]})
        >>> cfg.merge_method, [m.model for m in cfg.models]
        ('linear', ['a', 'b'])
    """
    if isinstance(source, Mapping):
        return parse_recipe(source, None, unused=unused)
    return parse_recipe(read_yaml(source), str(source), unused=unused)


_TOP_KEYS = (
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)


class _Parser:
    def __init__(self, file: str | None, unused: Unused = "error") -> None:
        self.file = file
        self.unused = unused
        self.ignored: list[str] = []  # warnings for parameters the method does not use

    def err(self, fld: str | None, msg: str) -> ConfigError:
        return ConfigError(self.file, fld, msg)

    def mapping(self, value: Any, fld: str | None, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.err(
                fld, f"must be a mapping with keys {', '.join(allowed)}, got {type(value).__name__}"
            )
        for key in value:
            if key not in allowed:
                hint = did_you_mean(str(key), allowed)
                where = f"{fld}.{key}" if fld else str(key)
                raise self.err(where, f"unknown key{hint}")
        return value

    def model_ref(self, value: Any, fld: str) -> str:
        if isinstance(value, Mapping) and "model" in value:
            # mergekit's long form {model: {path: ..., revision: ...}} is not supported; say so plainly.
            raise self.err(fld, "must be a model path or hub id string")
        if not isinstance(value, str) or not value.strip():
            raise self.err(fld, f"must be a model path or hub id string, got {value!r}")
        if "+" in value and not os.path.exists(value):
            raise self.err(
                fld,
                f"LoRA references (model+adapter) are not supported; merge the adapter first: {value!r}",
            )
        return value.strip()

    def setting(self, value: Any, fld: str, param: Param) -> Setting:
        def scalar(v: Any, f: str) -> Scalar:
            if isinstance(v, (list, tuple, Mapping)):
                raise self.err(f, f"must be {param.allowed()}, got a {type(v).__name__}")
            try:
                return param.check(v)
            except ValueError as e:
                raise self.err(f, str(e)) from None

        def value_or_gradient(v: Any, f: str) -> Scalar | tuple[Scalar, ...]:
            if isinstance(v, (list, tuple)):
                if not v:
                    raise self.err(f, "empty gradient: give at least one value")
                return tuple(scalar(x, f"{f}[{i}]") for i, x in enumerate(v))
            return scalar(v, f)

        def cond(v: Any, f: str) -> Cond:
            m = self.mapping(v, f, ("filter", "value"))
            if "value" not in m:
                raise self.err(f, "a {filter, value} entry needs a value")
            flt = m.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise self.err(
                    f"{f}.filter", f"must be a string (a substring of tensor names), got {flt!r}"
                )
            return Cond(value_or_gradient(m["value"], f"{f}.value"), flt)

        if isinstance(value, Mapping):
            return (cond(value, fld),)
        if isinstance(value, (list, tuple)):
            if not value:
                raise self.err(fld, "empty gradient: give at least one value")
            if all(isinstance(v, Mapping) for v in value):
                return tuple(cond(v, f"{fld}[{i}]") for i, v in enumerate(value))
            if any(isinstance(v, Mapping) for v in value):
                raise self.err(fld, "mixes {filter, value} entries with plain values; use one form")
            return value_or_gradient(value, fld)
        return scalar(value, fld)

    def parameters(self, value: Any, fld: str, method: Method, level: str) -> dict[str, Setting]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.err(
                fld, f"must be a mapping of parameter names to values, got {type(value).__name__}"
            )
        out: dict[str, Setting] = {}
        for name, setting in value.items():
            f = f"{fld}.{name}"
            param = method.param(str(name))
            if param is None:
                allowed = [p.name for p in method.params]
                if name in KNOWN_PARAMS:
                    if self.unused == "warn":
                        self.ignored.append(
                            f"{f}: {method.name} does not use {name}; ignored (as mergekit does)"
                        )
                        continue
                    raise self.err(
                        f,
                        f"merge_method {method.name} does not use `{name}` (another method's parameter); it takes: {', '.join(allowed) or 'none'}",
                    )
                if name == "dare" and isinstance(setting, Mapping):
                    raise self.err(
                        f,
                        f"`dare:` is not a mergekit parameter; DARE is merge_method dare_ties or dare_linear, and density is the fraction kept (density = 1 - drop_rate). {method.name} takes: {', '.join(allowed)}",
                    )
                hint = did_you_mean(str(name), allowed, show_all=0) or did_you_mean(
                    str(name), KNOWN_PARAMS, show_all=0
                )
                raise self.err(
                    f,
                    f"unknown parameter for merge_method {method.name}{hint}; it takes: {', '.join(allowed) or 'none'}",
                )
            if level == "model" and param.scope == "shared":
                raise self.err(
                    f,
                    f"`{name}` is set once per tensor, not per model: move it to the top-level (or slice) parameters",
                )
            out[str(name)] = self.setting(setting, f, param)
        return out

    def dtype(self, value: Any, fld: str) -> str | None:
        if value is None:
            return None
        name = str(value).removeprefix("torch.")
        if canonical(name) is None:
            raise self.err(
                fld, f"unknown dtype {value!r} (allowed: float16, bfloat16, float32, float64)"
            )
        return canonical(name)

    def layer_range(self, value: Any, fld: str) -> tuple[int, int]:
        if not (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise self.err(fld, f"must be [start, end] with two integers, got {value!r}")
        start, end = value
        if start < 0 or end <= start:
            raise self.err(fld, f"must satisfy 0 <= start < end, got [{start}, {end}]")
        return (start, end)


def parse_recipe(data: Any, file: str | None = None, *, unused: Unused = "error") -> MergeConfig:
    """Validate a parsed recipe mapping (see :func:`load_recipe`).

    ``unused`` is ``"error"`` here by default: the search space and the search check the recipes
    they generate with it, where a parameter the method ignores would be searched for nothing.
    """
    p = _Parser(file, unused)
    if data is None:
        raise p.err(None, "empty recipe: expected merge_method and models or slices")
    if isinstance(data, Mapping) and (
        "experts" in data or "gate_mode" in data
    ):  # before the key check: its keys are mergekit-moe's
        key = "experts" if "experts" in data else "gate_mode"
        raise p.err(
            key,
            "is a mergekit-moe key: this is a mixture-of-experts configuration; build it with `evomerge moe` instead of `evomerge merge`",
        )
    m = raw = p.mapping(data, None, _TOP_KEYS + ("modules",))
    spans: tuple[tuple[str, int], ...] = ()
    pre = ""  # a modules: recipe is read as the models:/slices: recipe it amounts to
    if "modules" in m:
        m, pre, spans = flatten_modules(m, file)
    name = m.get("merge_method")
    if name is None:
        raise p.err("merge_method", f"missing (allowed: {', '.join(sorted(METHODS))})")
    if not isinstance(name, str):
        raise p.err("merge_method", f"must be a method name, got {type(name).__name__}")
    if name in NOT_METHODS:
        raise p.err("merge_method", NOT_METHODS[name])
    if name not in METHODS:
        raise p.err(
            "merge_method", f"unknown merge_method {name!r}{did_you_mean(str(name), METHODS)}"
        )
    method = METHODS[name]
    has_models, has_slices = m.get("models") is not None, m.get("slices") is not None
    if has_models == has_slices:
        raise p.err(
            "models" if has_models else None,
            "give exactly one of models: or slices:" + (" (both are set)" if has_models else ""),
        )

    base = p.model_ref(m["base_model"], "base_model") if m.get("base_model") is not None else None
    models = slices = None
    if has_models:
        if not isinstance(m["models"], list) or not m["models"]:
            raise p.err(f"{pre}models", "must be a non-empty list of {model, parameters}")
        items = []
        for i, entry in enumerate(m["models"]):
            f = f"{pre}models[{i}]"
            e = p.mapping(entry, f, ("model", "parameters"))
            if "model" not in e:
                raise p.err(f, "needs a model")
            items.append(
                InputModel(
                    p.model_ref(e["model"], f"{f}.model"),
                    p.parameters(e.get("parameters"), f"{f}.parameters", method, "model"),
                )
            )
        dup = _first_duplicate([x.model for x in items])
        if dup:
            raise p.err("models", f"{dup!r} is listed twice")
        models = tuple(items)
    else:
        if not isinstance(m["slices"], list) or not m["slices"]:
            raise p.err(f"{pre}slices", "must be a non-empty list of {sources: [...]}")
        out_slices = []
        for si, s in enumerate(m["slices"]):
            f = f"{pre}slices[{si}]"
            sm = p.mapping(s, f, ("sources", "parameters", "base_model", "residual_weight"))
            if sm.get("residual_weight") is not None:
                raise p.err(f"{f}.residual_weight", "is not supported")
            srcs = sm.get("sources")
            if not isinstance(srcs, list) or not srcs:
                raise p.err(f"{f}.sources", "must be a non-empty list of {model, layer_range}")
            sources = []
            for j, src in enumerate(srcs):
                g = f"{f}.sources[{j}]"
                e = p.mapping(src, g, ("model", "layer_range", "parameters"))
                if "model" not in e or "layer_range" not in e:
                    raise p.err(g, "needs model and layer_range")
                sources.append(
                    InputModel(
                        p.model_ref(e["model"], f"{g}.model"),
                        p.parameters(e.get("parameters"), f"{g}.parameters", method, "model"),
                        p.layer_range(e["layer_range"], f"{g}.layer_range"),
                    )
                )
            lengths = {
                src.layer_range[1] - src.layer_range[0] for src in sources if src.layer_range
            }
            if len(lengths) > 1:
                ranges = ", ".join(f"{list(src.layer_range or ())}" for src in sources)
                raise p.err(
                    f"{f}.sources",
                    f"all sources of a slice must span the same number of layers, got {ranges}",
                )
            dup = _first_duplicate([x.model for x in sources])
            if dup:
                raise p.err(f"{f}.sources", f"{dup!r} appears twice in one slice")
            sbase = (
                p.model_ref(sm["base_model"], f"{f}.base_model")
                if sm.get("base_model") is not None
                else None
            )
            out_slices.append(
                OutputSlice(
                    tuple(sources),
                    p.parameters(sm.get("parameters"), f"{f}.parameters", method, "slice"),
                    sbase,
                )
            )
        slices = tuple(out_slices)

    tokenizer_source = None
    if m.get("tokenizer") is not None:
        if m.get("tokenizer_source") is not None:
            raise p.err("tokenizer", "give tokenizer or tokenizer_source, not both")
        t = p.mapping(m["tokenizer"], "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
        if t.get("tokens") or t.get("pad_to_multiple_of"):
            raise p.err(
                "tokenizer",
                "tokens and pad_to_multiple_of are not supported; use tokenizer_source: base or a model",
            )
        tokenizer_source = t.get("source")
    elif m.get("tokenizer_source") is not None:
        tokenizer_source = m["tokenizer_source"]
    if tokenizer_source is not None:
        if tokenizer_source == "union":
            raise p.err(
                "tokenizer_source",
                "union (a merged vocabulary) is not supported; use base or a model path",
            )
        tokenizer_source = p.model_ref(tokenizer_source, "tokenizer_source")

    chat_template = m.get("chat_template")
    if chat_template is not None and (
        not isinstance(chat_template, str)
        or ("{{" not in chat_template and "{%" not in chat_template)
    ):
        raise p.err(
            "chat_template", "must be a Jinja template string (named templates are not supported)"
        )

    cfg = MergeConfig(
        merge_method=str(name),
        models=models,
        slices=slices,
        base_model=base,
        parameters=p.parameters(m.get("parameters"), "parameters", method, "global"),
        dtype=p.dtype(m.get("dtype"), "dtype"),
        out_dtype=p.dtype(m.get("out_dtype"), "out_dtype"),
        tokenizer_source=tokenizer_source,
        chat_template=chat_template,
        source_file=file,
        raw=dict(raw),
        module_spans=spans,
    )
    _check_structure(cfg, p)
    required_params_missing(cfg)
    for line in p.ignored:
        print(f"{file}: {line}" if file else line, file=sys.stderr)
    return cfg


def _first_duplicate(items: list[str]) -> str | None:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def _check_structure(cfg: MergeConfig, p: _Parser) -> None:
    """Input counts and base rules that can be checked without opening any model."""
    method = cfg.method
    if cfg.models is not None:
        names = [x.model for x in cfg.models]
        if cfg.base_model and cfg.base_model not in names:
            names.append(cfg.base_model)  # mergekit merges an unlisted base too
        has_base = cfg.base_model is not None and method.base != "ignored"
        why = method.check_inputs(len(names), has_base)
        if why:
            raise p.err("models", why)
        return
    for i, s in enumerate(cfg.slices or ()):
        base = s.base_model or cfg.base_model
        names = [x.model for x in s.sources]
        if method.base != "ignored" and base is not None and base not in names:
            if method.base == "required" or len(cfg.slices or ()) == 1:
                raise p.err(
                    f"slices[{i}].sources",
                    f"base_model {base!r} must be one of the slice's sources for merge_method {method.name}",
                )
        has_base = base is not None and base in names and method.base != "ignored"
        why = method.check_inputs(len(names), has_base)
        if why:
            if method.name == "slerp" and base is None:
                why += " (slerp interpolates from base_model at t=0 to the other model at t=1: set base_model to one of the two)"
            raise p.err(f"slices[{i}].sources", why)


def required_params_missing(cfg: MergeConfig) -> None:
    """Raise when a required parameter is set nowhere for a model that needs it."""
    method = cfg.method
    groups: list[tuple[str, list[InputModel], Mapping[str, Setting], str | None]] = []
    if cfg.models is not None:
        listed = list(cfg.models)
        if cfg.base_model and cfg.base_model not in [x.model for x in listed]:
            listed.append(InputModel(cfg.base_model))
        groups.append(("models", listed, {}, cfg.base_model))
    else:
        for i, s in enumerate(cfg.slices or ()):
            groups.append(
                (
                    f"slices[{i}].sources",
                    list(s.sources),
                    s.parameters,
                    s.base_model or cfg.base_model,
                )
            )
    for fld, inputs, slice_params, base in groups:
        for prm in method.params:
            if not prm.required:
                continue
            if prm.scope == "shared":
                if prm.name not in slice_params and prm.name not in cfg.parameters:
                    raise ConfigError(
                        cfg.source_file,
                        "parameters",
                        f"merge_method {method.name} needs `{prm.name}` ({prm.allowed()})",
                    )
                continue
            for j, x in enumerate(inputs):
                if (
                    prm.scope == "non_base"
                    and base is not None
                    and x.model == base
                    and method.base != "ignored"
                ):
                    continue
                if (
                    prm.name not in x.parameters
                    and prm.name not in slice_params
                    and prm.name not in cfg.parameters
                ):
                    raise ConfigError(
                        cfg.source_file,
                        f"{fld}[{j}].parameters",
                        f"merge_method {method.name} needs `{prm.name}` for model {x.model!r} ({prm.allowed()})",
                    )

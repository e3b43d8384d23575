"""Parsing and validating a search space file: directives, the recipe's schema at a corner of the
space, and the ``search:`` and ``study:`` sections."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.dataflow.candidate import is_dataflow_mapping, parse_candidate
from evomerge.dataflow.section import dataflow_section
from evomerge.errors import ConfigError, did_you_mean
from evomerge.evaluation.section import parse_evaluate
from evomerge.io import plain_name, read_yaml
from evomerge.methods.registry import METHODS
from evomerge.moe.config import is_moe_mapping, parse_moe_config
from evomerge.recipe.schema import parse_recipe
from evomerge.space.directives import Directive, check_keys, number, whole
from evomerge.space.moe import check_moe_method, moe_section
from evomerge.space.prune import parse_prune
from evomerge.space.space import SearchSettings, Space
from evomerge.space.validate import validate_points

__all__ = ["parse_space", "load_space", "SAMPLERS"]

_KINDS = ("range", "int", "choice")
_MODIFIERS = ("log", "step", "anchors", "per_layers")
_SECTIONS = ("evaluate", "search", "study")
SAMPLERS = ("tpe", "cmaes", "random", "gp", "nsga2")
DEFAULT_SAMPLER = SearchSettings.sampler  # tpe: see SearchSettings
_SEARCH_KEYS = (
    "sampler",
    "trials",
    "seed",
    "baselines",
    "finalists",
    "objectives",
    "mask_seed",
    "startup_trials",
    "prune",
    "items",
)
_STUDY_KEYS = ("name", "storage")


class _SpaceParser:
    def __init__(self, file: str) -> None:
        self.file = file
        self.directives: list[Directive] = []
        self.names: set[str] = set()
        # The suffix unique() tries next for a name: a space of n same-named values is then read
        # in linear time, not quadratic.
        self.next_suffix: dict[str, int] = {}
        self.short = short

    def err(self, fld: str, msg: str) -> ConfigError:
        return ConfigError(self.file, fld, msg)

    def unique(self, name: str) -> str:
        base, i = name, self.next_suffix.get(name, 2)
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.next_suffix[base] = i
        self.names.add(name)
        return name

    def directive(
        self,
        m: Mapping[str, Any],
        fld: str,
        name: str,
        *,
        numbers_only: bool = False,
        ints: bool = False,
    ) -> Directive:
        check_keys(m, _KINDS + _MODIFIERS, fld, self.err, "unknown search directive")
        kinds = [k for k in m if k in _KINDS]
        if len(kinds) != 1:
            raise self.err(
                fld,
                "a search directive needs exactly one of range: [low, high], int: [low, high] or choice: [options]",
            )
        kind = kinds[0]
        spec = m[kind]
        f = f"{fld}.{kind}"
        anchors, per_layers = m.get("anchors"), m.get("per_layers")
        for key, val in (("anchors", anchors), ("per_layers", per_layers)):
            if val is not None and not whole(val, 1):
                raise self.err(f"{fld}.{key}", f"must be a positive integer, got {val!r}")
        if anchors and per_layers:
            raise self.err(fld, "give anchors or per_layers, not both")
        kw: dict[str, Any] = {"anchors": anchors, "per_layers": per_layers}
        if kind == "choice":
            if not isinstance(spec, list) or not spec:
                raise self.err(f, f"must be a non-empty list of options, got {spec!r}")
            if any(isinstance(c, (Mapping, list)) for c in spec):
                raise self.err(f, "options must be plain values (numbers, strings, booleans)")
            if len(set(map(repr, spec))) != len(spec):
                raise self.err(f, f"lists an option twice: {spec!r}")
            for k in ("log", "step"):
                if k in m:
                    raise self.err(f"{fld}.{k}", "applies to range and int, not choice")
            kw.update(kind="choice", choices=tuple(spec))
        else:
            if not (isinstance(spec, list) and len(spec) == 2 and all(map(number, spec))):
                raise self.err(f, f"must be [low, high] with two numbers, got {spec!r}")
            low, high = spec
            if kind == "int" and not all(isinstance(x, int) for x in spec):
                raise self.err(f, f"int bounds must be integers, got {spec!r}")
            if not low < high:
                raise self.err(
                    f,
                    f"empty range: `low < high` must hold, but got (low={low}, high={high}); for a fixed value write the value itself",
                )
            log = m.get("log", False)
            if not isinstance(log, bool):
                raise self.err(f"{fld}.log", f"must be true or false, got {log!r}")
            if log and low <= 0:
                raise self.err(f"{fld}.log", f"a log range needs low > 0, got {low}")
            step = m.get("step")
            if step is not None and (not number(step) or step <= 0 or step > high - low):
                raise self.err(f"{fld}.step", f"must be a number in (0, high - low], got {step!r}")
            if step is not None and log:
                raise self.err(f"{fld}.step", "cannot be combined with log: true")
            if kind == "range":
                low, high = float(low), float(high)
            kw.update(
                kind="int" if kind == "int" else "float", low=low, high=high, log=log, step=step
            )
        d = Directive(name=self.unique(name), path=fld, **kw)
        if ints and d.kind == "float":
            raise self.err(fld, "layer indices take int: [low, high], not range")
        if numbers_only and d.kind == "choice" and not all(map(number, d.choices)):
            raise self.err(f, "options of a parameter value must be numbers")
        self.directives.append(d)
        return d

    def is_directive(self, v: Any) -> bool:
        return isinstance(v, Mapping) and not ({"filter", "value"} & set(map(str, v)))

    def scalar(self, v: Any, fld: str, name: str, *, ints: bool = False) -> Any:
        """A directive where ``v`` is a mapping, else ``v`` itself."""
        return self.directive(v, fld, name, ints=ints) if isinstance(v, Mapping) else v

    def param_value(self, v: Any, fld: str, name: str) -> Any:
        """A parameter setting: scalar, gradient list, {filter, value} or a list of those."""
        if self.is_directive(v):
            return self.directive(v, fld, name, numbers_only=True)
        if isinstance(v, Mapping):  # {filter, value}
            out = dict(v)
            flt = v.get("filter")
            sub = f"{name}.{_slug(flt) if flt else 'rest'}"
            if "value" in v:
                out["value"] = self.param_value(v["value"], f"{fld}.value", sub)
            return out
        if isinstance(v, list):
            if any(isinstance(x, Mapping) and not self.is_directive(x) for x in v):
                return [self.param_value(x, f"{fld}[{i}]", name) for i, x in enumerate(v)]
            return [
                self.directive(x, f"{fld}[{i}]", f"{name}.{i}", numbers_only=True)
                if isinstance(x, Mapping)
                else x
                for i, x in enumerate(v)
            ]
        return v

    def params(self, block: Any, fld: str, suffix: str) -> Any:
        if not isinstance(block, Mapping):
            return block  # parse_recipe reports the type error
        return {k: self.param_value(v, f"{fld}.{k}", f"{k}{suffix}") for k, v in block.items()}

    def mappings(self, v: list[Any], fld: str, shape: str) -> None:
        """Refuse the first entry of list ``v`` that is no mapping (``shape`` says what it is)."""
        bad = next((i for i, x in enumerate(v) if not isinstance(x, Mapping)), None)
        if bad is not None:
            raise self.err(f"{fld}[{bad}]", f"must be a mapping {shape}")

    def models(self, v: list[Any], fld: str, tag: str = "") -> list[Any]:
        """A ``models:`` list with its directives; names end ``.<short model name>`` (``.<index>``
        when two entries share it) and ``tag``. An entry that is no mapping is refused."""
        self.mappings(v, fld, "{model, parameters}")
        shorts = [short(m.get("model")) for m in v]
        count = Counter(shorts)
        models = []
        for i, m in enumerate(v):
            e = dict(m)
            suffix = f".{shorts[i] if count[shorts[i]] == 1 else i}{tag}"
            if "model" in m:
                e["model"] = self.scalar(m["model"], f"{fld}[{i}].model", f"model{suffix}")
            if "parameters" in m:
                e["parameters"] = self.params(m["parameters"], f"{fld}[{i}].parameters", suffix)
            models.append(e)
        return models

    def slice(self, s: Mapping[str, Any], i: int) -> dict[str, Any]:
        """Slice ``i`` with its directives, named ``s<i>`` (``s<i>.<j>`` for each of several sources)."""
        e, sources = dict(s), s.get("sources") or []
        if not isinstance(sources, list) or not all(isinstance(x, Mapping) for x in sources):
            raise self.err(f"slices[{i}].sources", "must be a list of {model, layer_range}")
        if "sources" in s:
            e["sources"] = [
                self.source(
                    src, f"slices[{i}].sources[{j}]", f"s{i}.{j}" if len(sources) > 1 else f"s{i}"
                )
                for j, src in enumerate(sources)
            ]
        if "parameters" in s:
            e["parameters"] = self.params(s["parameters"], f"slices[{i}].parameters", f".s{i}")
        return e

    def source(self, src: Mapping[str, Any], f: str, tag: str) -> dict[str, Any]:
        se = dict(src)
        if "model" in src:
            se["model"] = self.scalar(src["model"], f"{f}.model", f"{tag}.model")
        lr = src.get("layer_range")
        if isinstance(lr, list):
            ends = [f"{tag}.{('start', 'end')[n] if n < 2 else n}" for n in range(len(lr))]
            se["layer_range"] = [
                self.scalar(x, f"{f}.layer_range[{n}]", ends[n], ints=True)
                for n, x in enumerate(lr)
            ]
            if any(
                isinstance(x, Directive) and (x.anchors or x.per_layers) for x in se["layer_range"]
            ):
                raise self.err(
                    f"{f}.layer_range", "layer indices take plain int: [low, high] directives"
                )
        if "parameters" in src:
            se["parameters"] = self.params(src["parameters"], f"{f}.parameters", f".{tag}")
        return se


def _directive_inside(v: Any) -> bool:
    items = v.values() if isinstance(v, Mapping) else v if isinstance(v, list) else ()
    return (isinstance(v, Mapping) and any(k in _KINDS for k in v)) or any(
        _directive_inside(x) for x in items
    )


def _slug(text: Any) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", str(text)).strip("_")
    return s or "x"


def short(ref: Any) -> str:
    """A model reference's short name, for parameter names."""
    return (
        _slug(str(ref).rstrip("/").split("/")[-1].split(":")[-1])
        if isinstance(ref, str)
        else "model"
    )


def parse_space(data: Any, file: str, base_dir: Path | None = None) -> Space:
    """Validate a space mapping (see :func:`load_space`)."""
    p = _SpaceParser(file)
    if not isinstance(data, Mapping):
        raise p.err(
            "",
            f"a search space must be a mapping (a mergekit recipe plus evaluate:/search:/study:), got {type(data).__name__}",
        )
    tree: dict[str, Any] = {}
    for k, v in data.items():
        if k in _SECTIONS:
            continue
        if k == "merge_method":
            tree[k] = p.scalar(v, k, "method")
        elif k in ("base_model", "dtype", "out_dtype", "tokenizer_source"):
            tree[k] = p.scalar(v, k, k)
        elif k == "parameters":
            tree[k] = p.params(v, k, "")
        elif k in ("models", "slices") and not isinstance(v, list):
            raise p.err(
                k,
                f"must be a list of {'models' if k == 'models' else 'slices'}, got {type(v).__name__}",
            )
        elif k == "models":
            tree[k] = p.models(v, "models")
        elif k == "slices":
            p.mappings(v, "slices", "{sources: [...]}")
            tree[k] = [p.slice(s, i) for i, s in enumerate(v)]
        elif k == "moe":
            tree[k] = moe_section(p, v)
        elif k == "dataflow":
            tree[k] = dataflow_section(p, v)
        elif k == "modules" and _directive_inside(v):
            raise p.err(
                "modules",
                "search directives inside modules: are not supported; write the space with models: or slices: (a modules: recipe merges as the models: or slices: recipe it amounts to)",
            )
        else:
            tree[k] = v
    method = tree.get("merge_method")
    if isinstance(method, Directive):
        for c in method.choices:
            if c not in METHODS and c != "moe":  # moe: checked with its section below
                raise p.err(
                    "merge_method.choice",
                    f"unknown merge_method {c!r}{did_you_mean(str(c), METHODS)}",
                )
    others = [k for k in tree if k != "dataflow"]
    if "dataflow" in tree and others:  # a data-flow space is its section (a merge is a source)
        raise p.err(
            others[0],
            "a data-flow space has no merge recipe beside its dataflow: section; to run a merge's layers, list it as a source: {recipe: file.yml} or {study: space.yml}",
        )
    if "dataflow" not in tree:
        check_moe_method(tree, p)
    search = _search_settings(data.get("search"), p)
    study_name, storage = _study_section(data.get("study"), p)
    _check_sampler(search, p)
    base = base_dir or Path(file).resolve().parent
    section = data.get("evaluate")
    evaluation = None if section is None else parse_evaluate(section, file, base, check_tasks=False)
    space = Space(file, base, tree, p.directives, evaluation, search, study_name, storage)
    if "dataflow" not in tree:  # the section checked itself; the rest when the models are open
        validate_points(space)
    return space


def _search_settings(section: Any, p: _SpaceParser) -> SearchSettings:
    if section is None:
        return SearchSettings()
    if not isinstance(section, Mapping):
        raise p.err("search", f"must be a mapping with keys {', '.join(_SEARCH_KEYS)}")
    check_keys(section, _SEARCH_KEYS, "search", p.err)

    def count(key: str, default: int | None, least: int, what: str = "") -> Any:
        v = section.get(key, default)
        if (v is not None or default is not None) and not whole(v, least):
            what = what or ("a positive integer" if least else "a non-negative integer")
            raise p.err(f"search.{key}", f"must be {what}, got {v!r}")
        return v

    trials = count("trials", 40, 1)
    items = count(
        "items", None, 1, "a positive integer (search items the searched trials may score in all)"
    )
    seed, mask_seed = count("seed", 0, 0), count("mask_seed", None, 0)
    finalists, startup = count("finalists", 5, 0), count("startup_trials", None, 0)
    objectives = section.get("objectives", ())
    if isinstance(objectives, str):
        objectives = (objectives,)
    if not isinstance(objectives, (list, tuple)) or not all(isinstance(o, str) for o in objectives):
        raise p.err(
            "search.objectives", "must be a list of task names (or `tasks` for every search task)"
        )
    prune = parse_prune(section.get("prune", True), p.err)
    if prune is not None and objectives:
        if "prune" in section:
            raise p.err(
                "search.prune",
                "stops a trial by its single score: it does not work with several objectives (set prune: false)",
            )
        prune = None  # on by default, off with several objectives
    # The default sampler: gp for one objective without pruning; tpe with pruning or several
    # objectives (the benchmark pages say why).
    sampler = section.get("sampler", "gp" if not objectives and prune is None else DEFAULT_SAMPLER)
    if sampler not in SAMPLERS:
        raise p.err(
            "search.sampler", f"unknown sampler {sampler!r}{did_you_mean(str(sampler), SAMPLERS)}"
        )
    baselines: list[tuple[str, Any]] = []
    named: dict[str, int] = {}  # name -> index of the baseline that has it
    raw = section.get("baselines") or []
    if not isinstance(raw, list):
        raise p.err(
            "search.baselines",
            "must be a list of {name, recipe} hand recipes (recipe: a mergekit recipe mapping or a file path)",
        )
    for i, b in enumerate(raw):
        f = f"search.baselines[{i}]"
        if not isinstance(b, Mapping) or "recipe" not in b:
            raise p.err(f, "must be {name: ..., recipe: <mergekit recipe mapping or file>}")
        check_keys(b, ("name", "recipe"), f, p.err)
        name = str(b.get("name") or f"hand_{i}")
        if name in named:
            raise p.err(
                f"{f}.name",
                f"baseline {name!r} is named twice (also search.baselines[{named[name]}]); give each baseline its own name",
            )
        named[name] = i
        recipe = b["recipe"]
        if isinstance(recipe, str):
            path = Path(recipe).expanduser()
            if not path.is_absolute():
                path = Path(p.file).resolve().parent / path
            if not path.is_file():
                raise p.err(f"{f}.recipe", f"recipe file {recipe!r} not found")
            recipe = read_yaml(path)
        if is_moe_mapping(recipe):  # a mixture of experts (a mergekit-moe configuration)
            parse_moe_config(recipe, f"{p.file} ({f}.recipe)")
        elif is_dataflow_mapping(recipe):  # a hand-written path (merge_method: dataflow)
            parse_candidate(recipe, f"{p.file} ({f}.recipe)")
        else:
            parse_recipe(recipe, f"{p.file} ({f}.recipe)")
        baselines.append((name, recipe))
    return SearchSettings(
        sampler,
        trials,
        seed,
        finalists,
        tuple(baselines),
        tuple(objectives),
        startup,
        mask_seed,
        prune,
        items,
    )


def _study_section(section: Any, p: _SpaceParser) -> tuple[str | None, str | None]:
    if section is None:
        return None, None
    if isinstance(section, str):
        return plain_name(section, p.file, "study"), None
    if not isinstance(section, Mapping):
        raise p.err("study", "must be a mapping {name, storage} or a study name")
    check_keys(section, _STUDY_KEYS, "study", p.err)
    name = section.get("name")
    if name is not None:
        plain_name(name, p.file, "study.name")  # it becomes the folder results/<name>
    storage = section.get("storage")
    if storage is not None and not isinstance(storage, str):
        raise p.err("study.storage", f"must be an Optuna storage URL string, got {storage!r}")
    return name, storage


def _check_sampler(search: SearchSettings, p: _SpaceParser) -> None:
    if search.sampler == "cmaes":
        cats = [d for d in p.directives if d.kind == "choice"]
        if cats:
            fix = (
                "set dataflow.layout: flat (on/off as numbers)"
                if cats[0].path == "dataflow.slots"
                else "make it a range"
            )
            raise p.err(
                "search.sampler",
                f"cmaes cannot sample categorical parameters ({cats[0].path} is a choice); use tpe, gp, random or nsga2, or {fix}",
            )
    if search.objectives and search.sampler not in ("nsga2", "tpe", "random"):
        raise p.err(
            "search.objectives",
            f"several objectives need sampler nsga2, tpe or random, not {search.sampler}",
        )


def load_space(path: str | Path) -> Space:
    """Read and validate a search space file.

    Args:
        path: the YAML file.

    Returns:
        The :class:`Space`.

    Raises:
        ConfigError: the file is missing or malformed, a directive is invalid, or the recipe part
            does not satisfy the mergekit schema (messages name the file and the field).

    Example:
        >>> space = load_space("search_spaces/demo.yml")   # doctest: +SKIP
        >>> [d.name for d in space.directives][:2]          # doctest: +SKIP
        ['method', 'weight.add']
    """
    path = Path(path)
    return parse_space(read_yaml(path), str(path), path.resolve().parent)

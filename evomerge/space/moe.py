"""The ``moe:`` section of a search space: mixture-of-experts candidates beside merges.

When ``merge_method`` is (or chooses) ``moe``, the candidate is a mergekit-moe configuration rendered
from this section; any other method renders the merge recipe and ignores the section::

    merge_method: {choice: [task_arithmetic, moe]}
    base_model: zoo:demo/base
    models: [...]                                  # the merge candidates
    moe:
      gate_mode: {choice: [hidden, cheap_embed]}
      experts_per_token: {int: [1, 2]}
      experts:
        - source_model: zoo:demo/rot
          positive_prompts: {from_task: zoo_rot, n: 2, among: 20}   # 2 consecutive search items of
                                                                     # the task, from its first 20
          optional: true                           # searched: whether this expert takes part
        - source_model:                            # an expert that is itself a merge ("MoE from merges")
            merge_method: task_arithmetic
            base_model: zoo:demo/base
            models:
              - model: zoo:demo/sort
                parameters: {weight: {range: [0.5, 1.0]}}
          positive_prompts: ["sort: dbeca ="]

Values may be directives as anywhere in a space. When fewer experts take part than
``experts_per_token``, every token uses all of them (``experts_per_token`` is lowered to their number);
a point where no expert takes part is a failed trial. ``from_task`` prompts are the prompts (without
answers) of the task's *search* items, never holdout items; a search resolves them through its
evaluator. Parameter names: ``moe.gate_mode``, ``moe.k``, ``moe.use.<expert>``,
``moe.prompts.<expert>`` (the first item's index), and a merged expert's own names with ``.e<i>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.moe.config import EXPERT_KEYS as CONFIG_EXPERT_KEYS
from evomerge.moe.config import parse_moe_config
from evomerge.recipe.schema import parse_recipe
from evomerge.space.directives import Directive, check_keys, whole

__all__ = [
    "MOE_KEYS",
    "EXPERT_KEYS",
    "FromTask",
    "check_moe_method",
    "check_prompt_tasks",
    "moe_model_refs",
    "moe_section",
    "render_moe",
    "validate_moe",
]

MOE_KEYS = ("gate_mode", "experts_per_token", "experts", "dtype")
EXPERT_KEYS = (*CONFIG_EXPERT_KEYS, "optional")  # an expert of a space may be optional
_FROM_TASK_KEYS = ("from_task", "n", "among")


@dataclass(frozen=True)
class FromTask:
    """Prompts drawn from a task's search items: ``n`` consecutive items starting at ``start``."""

    task: str
    n: int
    start: Directive | int
    fld: str


def parse_from_task(p: Any, m: Mapping[str, Any], fld: str, name: str) -> FromTask:
    """Validate ``{from_task, n, among}`` with the space parser ``p``; ``start`` becomes an int
    directive over ``[0, among - n]``."""
    check_keys(m, _FROM_TASK_KEYS, fld, p.err)
    task, n, among = m.get("from_task"), m.get("n", 2), m.get("among", 20)
    if not isinstance(task, str) or not task:
        raise p.err(f"{fld}.from_task", f"must be a search task name, got {task!r}")
    for key, v in (("n", n), ("among", among)):
        if not whole(v, 1):
            raise p.err(f"{fld}.{key}", f"must be a positive whole number, got {v!r}")
    if n > among:
        raise p.err(
            f"{fld}.n",
            f"is {n} but among is {among}: n prompts are drawn from the first `among` items",
        )
    start: Directive | int = (
        p.directive({"int": [0, among - n]}, f"{fld}.among", name, ints=True) if among > n else 0
    )
    return FromTask(task, n, start, fld)


def check_prompt_tasks(
    file: str, tree: Mapping[str, Any], prompts: Mapping[str, list[str]]
) -> None:
    """Check every ``from_task`` against the search tasks' items (once the evaluator exists).

    Raises:
        ConfigError: a task that is not a search task, or with fewer search items than ``among``.
    """
    for e in (tree.get("moe") or {}).get("experts") or ():
        for key in ("positive_prompts", "negative_prompts"):
            for p in e.get(key) if isinstance(e.get(key), list) else [e.get(key)]:
                if isinstance(p, FromTask):
                    _check_from_task(file, p, prompts)


def _check_from_task(file: str, p: FromTask, prompts: Mapping[str, list[str]]) -> None:
    if p.task not in prompts:
        raise ConfigError(
            file,
            f"{p.fld}.from_task",
            f"{p.task!r} is not a search task with item prompts{did_you_mean(p.task, prompts)}",
        )
    high = p.start.high if isinstance(p.start, Directive) else 0
    if int(high) + p.n > len(prompts[p.task]):
        raise ConfigError(
            file,
            f"{p.fld}.among",
            f"task {p.task} has {len(prompts[p.task])} search items, fewer than among",
        )


def moe_model_refs(section: Any) -> list[Any]:
    """Every model value the section names (plain references, choices, merged experts' models)."""
    out: list[Any] = []
    if not isinstance(section, Mapping):
        return out
    for e in section.get("experts") or ():
        if not isinstance(e, Mapping):
            continue
        src = e.get("source_model")
        if isinstance(src, Mapping):
            out.append(src.get("base_model"))
            out += [m.get("model") for m in src.get("models") or () if isinstance(m, Mapping)]
        else:
            out.append(src)
    return out


Prompts = Mapping[str, list[str]] | None


def render_moe(
    tree: Mapping[str, Any],
    value: Callable[[Any], Any],
    render_recipe: Callable[[Mapping[str, Any]], dict[str, Any]],
    prompts: Prompts,
) -> dict[str, Any]:
    """The mixture-of-experts configuration (``merge_method: moe`` form) at the current point.

    Args:
        tree: the space tree (``base_model``, ``dtype`` and the ``moe`` section).
        value: renders a value of the tree (directives sampled).
        render_recipe: renders a merged expert's recipe tree.
        prompts: each search task's item prompts; None before the evaluator exists (space
            validation), which renders placeholder prompts.

    Raises:
        ConfigError: a ``from_task`` task that is not a search task, or too few items.
    """
    section = tree["moe"]
    out: dict[str, Any] = {"merge_method": "moe", "base_model": value(tree.get("base_model"))}
    for key in ("gate_mode", "experts_per_token"):
        if key in section:
            out[key] = value(section[key])
    dtype = section.get("dtype", tree.get("dtype"))
    if dtype is not None:
        out["dtype"] = value(dtype)
    experts = []
    for e in section["experts"]:
        if "optional" in e and not value(e["optional"]):
            continue
        src = e["source_model"]
        entry = {"source_model": render_recipe(src) if isinstance(src, Mapping) else value(src)}
        for key in ("positive_prompts", "negative_prompts"):
            if key in e:
                p = e[key]
                parts = p if isinstance(p, list) else [p]
                if any(isinstance(x, FromTask) for x in parts):
                    entry[key] = [t for x in parts for t in _prompts(x, value, prompts)]
                else:
                    entry[key] = value(p)
        for key in ("noise_scale", "residual_scale"):
            if key in e:
                entry[key] = value(e[key])
        experts.append(entry)
    if not experts:
        raise ConfigError(
            None,
            "moe.experts",
            "no expert takes part at this point: every expert is optional and none was chosen",
        )
    out["experts"] = experts
    k = out.get("experts_per_token")
    if isinstance(k, int) and k > len(experts):  # fewer experts than a token may use: all of them
        out["experts_per_token"] = len(experts)
    return out


def _prompts(p: Any, value: Callable[[Any], Any], prompts: Prompts) -> list[Any]:
    """The prompts a list entry renders to: a plain one's value, a ``from_task``'s items."""
    if not isinstance(p, FromTask):
        return [value(p)]
    start = value(p.start)
    if prompts is None:
        return [f"<{p.task} item {start + i}>" for i in range(p.n)]
    if p.task not in prompts:
        raise ConfigError(
            None,
            f"{p.fld}.from_task",
            f"{p.task!r} is not a search task{did_you_mean(p.task, prompts)}",
        )
    items = prompts[p.task]
    if start + p.n > len(items):
        raise ConfigError(
            None, f"{p.fld}.among", f"task {p.task} has {len(items)} search items, fewer than among"
        )
    return list(items[start : start + p.n])


def check_moe_method(tree: Mapping[str, Any], p: Any) -> None:
    """Refuse a ``moe:`` section no method uses, or ``merge_method: moe`` without one."""
    method = tree.get("merge_method")
    methods = method.choices if isinstance(method, Directive) else (method,)
    if "moe" in methods and "moe" not in tree:
        raise p.err(
            "moe",
            "missing: merge_method moe builds a mixture of experts from the moe: section (gate_mode, experts_per_token, experts)",
        )
    if "moe" in tree and "moe" not in methods:
        raise p.err(
            "moe",
            "is used only when merge_method is moe or chooses it (merge_method: {choice: [..., moe]})",
        )


def moe_section(p: Any, v: Any) -> dict[str, Any]:
    """The ``moe:`` section with its directives.

    Args:
        p: the space parser (``err``, ``scalar``, ``params``, ``models``, ``directive``).
        v: the section as read.

    Returns:
        The section's tree (directives where values are searched).
    """
    if not isinstance(v, Mapping):
        raise p.err("moe", f"must be a mapping with keys {', '.join(MOE_KEYS)}")
    check_keys(v, MOE_KEYS, "moe", p.err)
    out: dict[str, Any] = {}
    if "gate_mode" in v:
        out["gate_mode"] = p.scalar(v["gate_mode"], "moe.gate_mode", "moe.gate_mode")
    if "experts_per_token" in v:
        k = p.scalar(v["experts_per_token"], "moe.experts_per_token", "moe.k", ints=True)
        out["experts_per_token"] = k
        bad = [c for c in (k.choices if isinstance(k, Directive) else ()) if not whole(c, 1)]
        if bad:
            raise p.err(
                "moe.experts_per_token.choice",
                f"options must be whole numbers >= 1, got {bad[0]!r}",
            )
    if "dtype" in v:
        out["dtype"] = p.scalar(v["dtype"], "moe.dtype", "moe.dtype")
    experts = v.get("experts")
    if not isinstance(experts, list) or not experts:
        raise p.err("moe.experts", "must be a non-empty list of {source_model, positive_prompts}")
    shorts = [
        p.short(e.get("source_model"))
        if isinstance(e, Mapping) and isinstance(e.get("source_model"), str)
        else f"e{i}"
        for i, e in enumerate(experts)
    ]
    out["experts"] = []
    for i, e in enumerate(experts):
        f = f"moe.experts[{i}]"
        if not isinstance(e, Mapping):
            raise p.err(f, "must be a mapping {source_model, positive_prompts, ...}")
        check_keys(e, EXPERT_KEYS, f, p.err)
        if "source_model" not in e:
            raise p.err(f, "needs a source_model")
        tag = shorts[i] if shorts.count(shorts[i]) == 1 else f"e{i}"
        x: dict[str, Any] = {}
        src = e["source_model"]
        if isinstance(src, Mapping) and "merge_method" in src:
            x["source_model"] = _nested_recipe(p, src, f"{f}.source_model", f"e{i}")
        else:
            x["source_model"] = p.scalar(src, f"{f}.source_model", f"moe.model.{tag}")
        for key in ("positive_prompts", "negative_prompts"):
            if key in e:
                val = e[key]
                name = f"moe.prompts.{tag}" + ("" if key == "positive_prompts" else ".neg")
                if isinstance(val, Mapping):
                    x[key] = parse_from_task(p, val, f"{f}.{key}", name)
                elif isinstance(val, list):  # prompts, and {from_task} entries among them
                    x[key] = [
                        parse_from_task(p, v, f"{f}.{key}[{j}]", f"{name}.{j}")
                        if isinstance(v, Mapping)
                        else v
                        for j, v in enumerate(val)
                    ]
                else:
                    x[key] = val
        for key in ("noise_scale", "residual_scale"):
            if key in e:
                x[key] = p.scalar(e[key], f"{f}.{key}", f"moe.{key}.{tag}")
        opt = e.get("optional", False)
        if opt is True:  # searched: whether this expert takes part
            opt = {"choice": [True, False]}
        if isinstance(opt, Mapping):
            x["optional"] = p.directive(opt, f"{f}.optional", f"moe.use.{tag}")
        elif opt is not False:
            raise p.err(f"{f}.optional", f"must be true or false, got {opt!r}")
        out["experts"].append(x)
    k = out.get("experts_per_token")
    most = k if not isinstance(k, Directive) else k.high if k.kind == "int" else max(k.choices)
    if isinstance(most, (int, float)) and most > len(experts):
        raise p.err(
            "moe.experts_per_token",
            f"goes up to {most} but the section lists {len(experts)} experts",
        )
    return out


def _nested_recipe(p: Any, m: Mapping[str, Any], fld: str, tag: str) -> dict[str, Any]:
    """A merged expert's recipe (``merge_method``, ``base_model``, ``models``, ``parameters``, ``dtype``)."""
    allowed = ("merge_method", "base_model", "models", "parameters", "dtype")
    check_keys(m, allowed, fld, p.err, "unknown key of a merged expert's recipe")
    out: dict[str, Any] = {}
    out["merge_method"] = p.scalar(m["merge_method"], f"{fld}.merge_method", f"method.{tag}")
    for k in ("base_model", "dtype"):
        if k in m:
            out[k] = p.scalar(m[k], f"{fld}.{k}", f"{k}.{tag}")
    if "parameters" in m:
        out["parameters"] = p.params(m["parameters"], f"{fld}.parameters", f".{tag}")
    models = m.get("models")
    if not isinstance(models, list) or not models:
        raise p.err(f"{fld}.models", "must be a non-empty list of {model, parameters}")
    out["models"] = p.models(models, f"{fld}.models", f".{tag}")
    return out


def validate_moe(file: str, config: Mapping[str, Any]) -> None:
    """Check a rendered mixture of experts (placeholder prompts), merged experts as recipes."""
    plain = dict(config)
    plain["experts"] = []
    for i, e in enumerate(config["experts"]):
        e = dict(e)
        if isinstance(e["source_model"], Mapping):
            parse_recipe(e["source_model"], f"{file} (moe.experts[{i}].source_model)")
            e["source_model"] = f"merged expert {i}"
        plain["experts"].append(e)
    try:
        parse_moe_config(plain, file)
    except ConfigError as err:  # name the field as the space writes it
        fld = err.field if err.field in (None, "base_model", "merge_method") else f"moe.{err.field}"
        raise ConfigError(file, fld, err.message) from None

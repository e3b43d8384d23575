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

Values may be directives as anywhere in a space. ``from_task`` prompts are the prompts (without
answers) of the task's *search* items, never holdout items; a search resolves them through its
evaluator. Parameter names: ``moe.gate_mode``, ``moe.k``, ``moe.use.<expert>``,
``moe.prompts.<expert>`` (the first item's index), and a merged expert's own names with ``.e<i>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.space.directives import Directive

__all__ = ["MOE_KEYS", "EXPERT_KEYS", "FromTask", "check_prompt_tasks", "moe_model_refs", "render_moe"]

MOE_KEYS = ("gate_mode", "experts_per_token", "experts", "dtype")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale", "optional")
_FROM_TASK_KEYS = ("from_task", "n", "among")


@dataclass(frozen=True)
class FromTask:
    """Prompts drawn from a task's search items: ``n`` consecutive items starting at ``start``."""

    task: str
    n: int
    start: Directive | int
    fld: str


def parse_from_task(m: Mapping[str, Any], file: str, fld: str, name: str, directive: Callable[..., Directive]) -> FromTask:
    """Validate ``{from_task, n, among}``; ``start`` becomes an int directive over ``[0, among - n]``."""
    for k in m:
        if k not in _FROM_TASK_KEYS:
            raise ConfigError(file, f"{fld}.{k}", f"unknown key{did_you_mean(str(k), _FROM_TASK_KEYS)}")
    task, n, among = m.get("from_task"), m.get("n", 2), m.get("among", 20)
    if not isinstance(task, str) or not task:
        raise ConfigError(file, f"{fld}.from_task", f"must be a search task name, got {task!r}")
    for key, v in (("n", n), ("among", among)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(file, f"{fld}.{key}", f"must be a positive whole number, got {v!r}")
    if n > among:
        raise ConfigError(file, f"{fld}.n", f"is {n} but among is {among}: n prompts are drawn from the first `among` items")
    start: Directive | int = directive({"int": [0, among - n]}, f"{fld}.among", name, ints=True) if among > n else 0
    return FromTask(task, n, start, fld)


def check_prompt_tasks(file: str, tree: Mapping[str, Any], prompts: Mapping[str, list[str]]) -> None:
    """Check every ``from_task`` against the search tasks' items (once the evaluator exists).

    Raises:
        ConfigError: a task that is not a search task, or with fewer search items than ``among``.
    """
    for e in (tree.get("moe") or {}).get("experts") or ():
        for key in ("positive_prompts", "negative_prompts"):
            for p in e.get(key) if isinstance(e.get(key), list) else [e.get(key)]:
                if isinstance(p, FromTask):
                    _check_one(file, p, prompts)


def _check_one(file: str, p: FromTask, prompts: Mapping[str, list[str]]) -> None:
    if p.task not in prompts:
        raise ConfigError(file, f"{p.fld}.from_task", f"{p.task!r} is not a search task with item prompts{did_you_mean(p.task, prompts)}")
    high = p.start.high if isinstance(p.start, Directive) else 0
    if int(high) + p.n > len(prompts[p.task]):
        raise ConfigError(file, f"{p.fld}.among", f"task {p.task} has {len(prompts[p.task])} search items, fewer than among")


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


Value = Callable[[Any], Any]
Prompts = Mapping[str, list[str]] | None


def render_moe(tree: Mapping[str, Any], value: Value, render_recipe: Callable[[Mapping[str, Any]], dict[str, Any]], prompts: Prompts) -> dict[str, Any]:
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
        entry: dict[str, Any] = {}
        src = e["source_model"]
        entry["source_model"] = render_recipe(src) if isinstance(src, Mapping) else value(src)
        for key in ("positive_prompts", "negative_prompts"):
            if key in e:
                p = e[key]
                parts = p if isinstance(p, list) else [p]
                if any(isinstance(x, FromTask) for x in parts):
                    entry[key] = [t for x in parts for t in (_prompts(x, value(x.start), prompts) if isinstance(x, FromTask) else [value(x)])]
                else:
                    entry[key] = value(p)
        for key in ("noise_scale", "residual_scale"):
            if key in e:
                entry[key] = value(e[key])
        experts.append(entry)
    out["experts"] = experts
    return out


def _prompts(p: FromTask, start: int, prompts: Prompts) -> list[str]:
    if prompts is None:
        return [f"<{p.task} item {start + i}>" for i in range(p.n)]
    if p.task not in prompts:
        raise ConfigError(None, f"{p.fld}.from_task", f"{p.task!r} is not a search task{did_you_mean(p.task, prompts)}")
    items = prompts[p.task]
    if start + p.n > len(items):
        raise ConfigError(None, f"{p.fld}.among", f"task {p.task} has {len(items)} search items, fewer than among")
    return list(items[start : start + p.n])

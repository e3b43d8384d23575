"""Per-tensor parameter resolution: filters, gradients and precedence (mergekit 0.1.5 semantics).

For one output tensor at relative depth ``t`` in its slice:

- a scalar is its own value; a gradient ``[v0, ..., vn]`` is linearly interpolated at position
  ``t * n`` (booleans and strings pick ``values[int(t * n)]``);
- a list of ``{filter, value}`` entries takes the first entry whose filter is a substring of the
  tensor name (no filter, or ``*``, matches all); when none matches the next level is consulted;
- levels in precedence order: the source's own parameters, the slice's, the recipe's top-level,
  then the method's default. Shared parameters skip the first level.

Shared parameters are matched against the output tensor's name, per-input parameters against the
input tensor's name (they differ when a slice takes other layers than it writes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.methods.spec import Method, Param
from evomerge.recipe.schema import Cond, Setting

__all__ = ["evaluate_setting", "resolve", "ParamError"]


class ParamError(ValueError):
    """A parameter could not be resolved for a tensor (missing required value, bad value)."""


def evaluate_setting(setting: Setting, tensor_name: str, t: float, param: Param) -> Any:
    """The value of one setting for one tensor, or None when no filter entry matches.

    Example:
        >>> from evomerge.methods.registry import METHODS
        >>> t_param = METHODS["slerp"].param("t")
        >>> evaluate_setting((0.0, 1.0, 0.0), "model.layers.3.mlp.up_proj.weight", 0.25, t_param)
        0.5
    """
    if isinstance(setting, tuple) and setting and isinstance(setting[0], Cond):
        for cond in setting:
            assert isinstance(cond, Cond)
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t, param)
        return None
    if isinstance(setting, tuple):
        values = list(setting)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i0 = int(pos)
        i1 = min(len(values) - 1, i0 + 1)
        frac = pos - i0
        v = (1 - frac) * float(values[i0]) + frac * float(values[i1])  # type: ignore[arg-type]
        return param.check(round(v) if param.kind is int else v)
    return setting


def resolve(
    method: Method,
    *,
    out_name: str,
    in_names: Sequence[str],
    source_params: Sequence[Mapping[str, Setting]],
    slice_params: Mapping[str, Setting],
    global_params: Mapping[str, Setting],
    base: int | None,
    t: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resolve every declared parameter of ``method`` for one output tensor.

    Args:
        method: the merge method (its declarations give scopes and defaults).
        out_name: the output tensor's name (filters of shared parameters match it).
        in_names: each input's tensor name (filters of per-input parameters match these).
        source_params: each input's own ``parameters:``.
        slice_params, global_params: the slice's and the recipe's ``parameters:``.
        base: index of the base input, or None.
        t: relative depth of the tensor in its slice, in [0, 1].

    Returns:
        ``(shared, per_input)``: shared values, and one dict of per-input values per input (the
        base's dict holds only ``input``-scope parameters).

    Raises:
        ParamError: a required parameter has no value for this tensor, or a value is invalid.
    """
    shared: dict[str, Any] = {}
    per_input: list[dict[str, Any]] = [{} for _ in in_names]
    for p in method.params:
        if p.scope == "shared":
            shared[p.name] = _first(
                p, (slice_params, global_params), out_name, t, f"tensor {out_name}"
            )
            continue
        for i, name in enumerate(in_names):
            if p.scope == "non_base" and i == base:
                continue
            per_input[i][p.name] = _first(
                p,
                (source_params[i], slice_params, global_params),
                name,
                t,
                f"input {i} of tensor {out_name}",
            )
    return shared, per_input


def _first(
    p: Param, levels: Sequence[Mapping[str, Setting]], name: str, t: float, where: str
) -> Any:
    for level in levels:
        if p.name in level:
            try:
                value = evaluate_setting(level[p.name], name, t, p)
            except ValueError as e:
                raise ParamError(f"`{p.name}` for {where}: {e}") from None
            if value is not None:
                return value
    if p.required:
        raise ParamError(
            f"`{p.name}` has no value for {where} ({p.allowed()}); no filter matched it and it has no default"
        )
    return p.default

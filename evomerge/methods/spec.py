"""What a merge method declares: its parameters, their scopes and bounds, and its inputs.

A method is data (:class:`Method`): which parameters it takes, at what scope, with which defaults
and allowed values, how many inputs and whether it needs a base. Recipes and search spaces are
validated against it before any tensor moves. The tensor math lives in the engine's kernels
(:mod:`evomerge.engine.kernels`), chosen by the method's name and its data; nothing here imports it.

The semantics follow mergekit 0.1.5 so that a recipe means the same thing in both tools. The
task-vector family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) is one generalized method
whose variants differ only by data: a sparsifier, sign consensus on or off, and defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["REQUIRED", "Param", "Method", "Sparsifier"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """A parameter a method accepts.

    Attributes:
        name: key in a recipe's ``parameters:``.
        kind: ``float``, ``int`` or ``bool``.
        scope: ``"shared"`` (one value per tensor), ``"input"`` (one per input model) or
            ``"non_base"`` (one per input model other than the base; the base's is never read).
        default: value when no recipe level sets it; ``REQUIRED`` makes it mandatory.
        low, high: bounds for numbers; ``low_open``/``high_open`` exclude the bound itself.
        optional: the value may be null (``scale`` of passthrough).
    """

    name: str
    kind: type
    scope: str = "shared"
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def allowed(self) -> str:
        """Human description of the allowed values, for error messages."""
        if self.kind is bool:
            return "true or false"
        what = "an integer" if self.kind is int else "a number"
        if self.low is None and self.high is None:
            return what
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{what} in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any) -> Any:
        """Coerce one scalar to this parameter's kind, or raise ``ValueError`` saying what is allowed."""
        if (value is None and self.optional) or (self.kind is bool and isinstance(value, bool)):
            return value
        wrong = f"must be {self.allowed()}, got "  # YAML's spelling of null and booleans
        if value is None or isinstance(value, bool):
            raise ValueError(wrong + ("null" if value is None else str(value).lower()))
        if isinstance(value, str) and self.kind is not bool:
            # PyYAML reads `1e-3` (no dot) as a string; mergekit accepts such numbers too.
            try:
                value = float(value)
            except ValueError:
                raise ValueError(wrong + repr(value)) from None
        if (
            self.kind is bool
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
            or (self.kind is int and float(value) != int(value))
        ):
            raise ValueError(wrong + repr(value))
        value = int(value) if self.kind is int else float(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(f"{wrong}{value:g}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(f"{wrong}{value:g}")
        return value


class Sparsifier(str, Enum):
    """How a task-vector method sparsifies each input's task vector (delta) before combining."""

    MAGNITUDE = "magnitude"  # the top int(density * n) entries by |delta| (TIES)
    RANDOM = "random"  # each entry with probability density (DARE)
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # drop the top gamma fraction, then the smallest
    DELLA = "della"  # probabilities from density - epsilon to + epsilon, ranked by |delta| in a row


@dataclass(frozen=True)
class Method:
    """A merge method: its declaration (the engine picks its kernel by name).

    Attributes:
        name: the ``merge_method`` string.
        params: what it accepts.
        base: ``"required"`` (the base must be among the inputs), ``"optional"`` (used when given)
            or ``"ignored"`` (a base_model in the recipe plays no special role).
        min_inputs, max_inputs, min_non_base, max_non_base: input counts per output tensor.
        sparsifier: for the task-vector family, how each task vector is sparsified (``None``: kept
            whole).
        consensus: for the task-vector family, TIES sign election on or off.
        reference: the paper or post that defines it.
    """

    name: str
    params: tuple[Param, ...]
    base: str = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    sparsifier: Sparsifier | None = None
    consensus: bool = False
    reference: str = ""
    _by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})

    def param(self, name: str) -> Param | None:
        return self._by_name.get(name)

    def check_inputs(self, n_inputs: int, has_base: bool) -> str | None:
        """Return why ``n_inputs`` inputs (one of them the base if ``has_base``) are not allowed, or None."""
        if self.base == "required" and not has_base:
            return f"merge_method {self.name} needs a base_model that is one of the merged models"
        non_base = n_inputs - int(has_base and self.base != "ignored")
        if n_inputs < self.min_inputs:
            return (
                f"merge_method {self.name} needs at least {self.min_inputs} models, got {n_inputs}"
            )
        if self.max_inputs is not None and n_inputs > self.max_inputs:
            exact = "exactly" if self.max_inputs == self.min_inputs else "at most"
            return (
                f"merge_method {self.name} takes {exact} {self.max_inputs} model(s), got {n_inputs}"
            )
        if self.min_non_base is not None and non_base < self.min_non_base:
            return f"merge_method {self.name} needs at least {self.min_non_base} models besides the base, got {non_base}"
        if self.max_non_base is not None and non_base > self.max_non_base:
            exact = "exactly" if self.max_non_base == self.min_non_base else "at most"
            return f"merge_method {self.name} takes {exact} {self.max_non_base} models besides the base, got {non_base}"
        return None

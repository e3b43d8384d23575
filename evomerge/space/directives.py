"""A directive: one searched value put where a recipe has a plain value (see :mod:`evomerge.space`),
and the value checks the space's parsers share."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError, did_you_mean

__all__ = ["Directive", "Suggest", "LayersOf", "Err", "number", "whole", "check_keys"]


@dataclass(frozen=True)
class Directive:
    """One searched value (or a list of them, for ``anchors``/``per_layers``).

    Attributes:
        kind: ``float``, ``int`` or ``choice``.
        name: the Optuna parameter name (and ``p_<name>`` column of the results table).
        path: where it is written in the space file, for error messages.
        low, high, log, step: the range of numbers.
        choices: the options of a ``choice``.
        anchors: a gradient of this many searched values.
        per_layers: one value per group of this many consecutive layers.
    """

    kind: str
    name: str
    path: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    anchors: int | None = None
    per_layers: int | None = None

    def names(self, n_layers: int | None = None) -> list[str]:
        """The Optuna parameter names this directive samples."""
        if self.anchors:
            return [f"{self.name}.{i}" for i in range(self.anchors)]
        if self.per_layers:
            groups = math.ceil((n_layers or self.per_layers) / self.per_layers)
            return [f"{self.name}.g{i}" for i in range(groups)]
        return [self.name]

    def contains(self, value: Any) -> bool:
        """Whether a plain value is a point of this directive (for hand recipes)."""
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low - 1e-12 <= value <= self.high + 1e-12


Suggest = Callable[[str, Directive], Any]
LayersOf = Callable[[str], int]
Err = Callable[[str, str], ConfigError]
"""``(field, message) -> ConfigError`` of the space file."""


def number(v: Any) -> bool:
    """Whether ``v`` is an int or a float (not a boolean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whole(v: Any, least: int = 0) -> bool:
    """Whether ``v`` is an integer (not a boolean) of at least ``least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def check_keys(
    m: Mapping[Any, Any], allowed: Collection[str], fld: str, err: Err, what: str = "unknown key"
) -> None:
    """Refuse a key of ``m`` that is not ``allowed``, naming ``fld.key`` and the close matches.

    Raises:
        ConfigError: ``what`` and the close matches, for the first key not allowed.
    """
    for k in m:
        if k not in allowed:
            raise err(f"{fld}.{k}", f"{what}{did_you_mean(str(k), allowed)}")

"""A directive: one searched value put where a recipe has a plain value (see :mod:`evomerge.space`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Directive", "Suggest", "LayersOf"]


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

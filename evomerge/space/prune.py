"""The ``search.prune`` setting: stop hopeless candidates early, in rounds of search items.

::

    search:
      prune: {rounds: [0.1, 0.2, 0.4, 1.0], against: 1, alpha: 0.1}   # or true (these defaults), or false

- ``rounds``: growing shares of the search items (the same items for every candidate, each task
  in proportion) after which a candidate may be stopped; the last is 1.0, so a candidate that is
  never stopped is scored on every item, with the score an evaluation without pruning gives.
- ``against``: the finished trial to beat: 1 is the best so far, ``k`` the k-th best. A candidate
  is stopped once a paired test on the items scored so far says it cannot beat that trial.
- ``alpha``: the test's one-sided error per round: the chance of stopping a candidate whose full
  score would have tied or beaten that trial (smaller: fewer wrong stops, fewer items saved).

The rule itself lives in :mod:`evomerge.search.pruning`; this module only parses the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.space.directives import Err, check_keys, number, whole

__all__ = ["PruneSettings", "parse_prune", "PRUNE_KEYS"]

PRUNE_KEYS = ("rounds", "against", "alpha")


@dataclass(frozen=True)
class PruneSettings:
    """The parsed ``search.prune`` mapping (see the module docstring); defaults are ``prune: true``."""

    rounds: tuple[float, ...] = (0.1, 0.2, 0.4, 1.0)
    against: int = 1
    alpha: float = 0.1


def parse_prune(value: Any, err: Err) -> PruneSettings | None:
    """Parse ``search.prune``.

    Args:
        value: the raw value: true, false, null or a mapping with keys :data:`PRUNE_KEYS`.
        err: ``(field, message) -> ConfigError`` of the space file.

    Returns:
        The settings, or None when pruning is off.

    Raises:
        ConfigError: an unknown key or a value out of range.

    Example:
        >>> from evomerge.errors import ConfigError
        >>> parse_prune({"rounds": [0.5, 1]}, lambda f, m: ConfigError("s.yml", f, m)).rounds
        (0.5, 1.0)
    """
    if value is None or value is False:
        return None
    if value is True:
        return PruneSettings()
    if not isinstance(value, Mapping):
        raise err(
            "search.prune",
            f"must be true, false or a mapping with keys {', '.join(PRUNE_KEYS)}, got {value!r}",
        )
    check_keys(value, PRUNE_KEYS, "search.prune", err)
    d = PruneSettings()
    rounds = value.get("rounds", list(d.rounds))
    if not isinstance(rounds, list) or not rounds or not all(number(r) for r in rounds):
        raise err(
            "search.prune.rounds",
            f"must be a list of shares of the search items, such as [0.1, 0.25, 1.0], got {rounds!r}",
        )
    if (
        not all(0 < r <= 1 for r in rounds)
        or any(b <= a for a, b in zip(rounds, rounds[1:], strict=False))
        or rounds[-1] != 1
    ):
        raise err(
            "search.prune.rounds",
            f"must rise strictly within (0, 1] and end at 1.0 (every item is scored by a candidate that is not stopped), got {rounds!r}",
        )
    against = value.get("against", d.against)
    if not whole(against, 1):
        raise err(
            "search.prune.against",
            f"must be a positive integer (1: beat the best finished trial, k: the k-th best), got {against!r}",
        )
    alpha = value.get("alpha", d.alpha)
    if not number(alpha) or not 0 < alpha < 0.5:
        raise err(
            "search.prune.alpha",
            f"must be a number in (0, 0.5), the one-sided error of the test per round, got {alpha!r}",
        )
    return PruneSettings(tuple(float(r) for r in rounds), int(against), float(alpha))

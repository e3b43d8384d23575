"""The ``zoo:`` reference scheme: ``zoo:<size>/<model>`` is a zoo model, ``zoo:<size>`` its tasks.

Registered through the ``evomerge.schemes`` entry point (and by the CLI), so that nothing in the
engine or the evaluator imports the zoo.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.schemes import Scheme
from evomerge.zoo import SKILLS, ZOO_SIZES, resolve_zoo_ref

__all__ = ["SCHEME"]


def _resolve(rest: str) -> Path | None:
    found = resolve_zoo_ref(f"zoo:{rest}")
    return None if found is None else Path(found)


def _examples() -> list[str]:
    return [f"zoo:{s}" for s in ZOO_SIZES] + [
        f"zoo:{s}/{m}" for s in ZOO_SIZES for m in ("base", *SKILLS)
    ]


SCHEME = Scheme("zoo", _resolve, _examples)

"""References with a scheme prefix (``zoo:demo/base``), resolved to local paths through a registry.

A model reference in a recipe is a directory, a Hugging Face hub id, or ``<scheme>:<rest>`` for a
scheme some package registers; the same goes for a space's ``evaluate.include_path``. The engine and
the evaluator resolve references here and know nothing of what provides them (the demo zoo registers
``zoo:``). A scheme is registered explicitly with :func:`register`, or found through the
``evomerge.schemes`` entry-point group of installed packages on first use.

Example:
    >>> register(Scheme("mem", lambda rest: Path("/models") / rest, lambda: ["mem:a"]))
    >>> resolve("mem:a"), resolve("/models/a"), scheme_of("org/name")
    (PosixPath('/models/a'), None, None)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["Scheme", "register", "scheme_of", "resolve", "known_refs"]

_PREFIX = re.compile(r"^([a-z][a-z0-9_]*):(?!//)")


@dataclass(frozen=True)
class Scheme:
    """A reference scheme.

    Attributes:
        name: the prefix before ``:``.
        resolve: the part after ``name:`` -> a local path, or None when it names nothing. It may
            build what it names on first use (the demo zoo does).
        examples: the references it knows, for "did you mean" messages.
    """

    name: str
    resolve: Callable[[str], Path | None]
    examples: Callable[[], list[str]] = list


_SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> None:
    """Register (or replace) a scheme."""
    _SCHEMES[scheme.name] = scheme


def _lookup(name: str) -> Scheme | None:
    if name not in _SCHEMES:
        for ep in entry_points(group="evomerge.schemes"):
            if ep.name == name:
                register(ep.load())
    return _SCHEMES.get(name)


def scheme_of(ref: str) -> Scheme | None:
    """The registered scheme of ``ref``, or None when ``ref`` is a path or hub id."""
    m = _PREFIX.match(ref)
    return _lookup(m.group(1)) if m else None


def resolve(ref: str) -> Path | None:
    """The local path of a scheme reference; None when ``ref`` has no registered scheme or names
    nothing in it."""
    scheme = scheme_of(ref)
    return None if scheme is None else scheme.resolve(ref[len(scheme.name) + 1 :])


def known_refs(ref: str) -> list[str]:
    """What the scheme of ``ref`` knows (empty when it has none)."""
    scheme = scheme_of(ref)
    return [] if scheme is None else list(scheme.examples())

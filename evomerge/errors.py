"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing model, a wrong flag) is raised as an
:class:`EvomergeError`. The CLI prints its message as one line and exits with code 2, without a
traceback. Programming errors stay ordinary exceptions so that they keep their traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["EvomergeError", "ConfigError", "did_you_mean", "one_line", "failure_line"]


class EvomergeError(Exception):
    """An error caused by user input; the CLI reports it in one line and exits with code 2."""


class ConfigError(EvomergeError):
    """A bad value in a YAML file: names the file, the field path and what is allowed.

    Example:
        >>> str(ConfigError("space.yml", "models[1].parameters.density", "must be in (0, 1], got 1.5"))
        'space.yml: models[1].parameters.density: must be in (0, 1], got 1.5'
    """

    def __init__(self, file: str | None, field: str | None, message: str) -> None:
        self.file = file
        self.field = field
        self.message = message
        where = ": ".join(part for part in (file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(name: str, choices: Iterable[str], *, show_all: int = 12) -> str:
    """Suffix for an 'unknown name' message: close matches first, then what is available.

    Example:
        >>> did_you_mean("tie", ["ties", "dare_ties", "linear"])
        ' (did you mean ties, dare_ties?; allowed: dare_ties, linear, ties)'
    """
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    close += [c for c in choices if name and name in c and c not in close][: 3 - len(close)]
    parts = []
    if close:
        parts.append("did you mean " + ", ".join(close) + "?")
    if len(choices) <= show_all:
        parts.append("allowed: " + ", ".join(choices))
    return f" ({'; '.join(parts)})" if parts else ""


def one_line(text: object) -> str:
    """Collapse a message to a single line (exception texts from libraries can span several)."""
    return " ".join(str(text).split())


def failure_line(e: BaseException) -> str:
    """Why a candidate failed, for the ``error`` column: a user error's message, else the exception's
    type and message, on one line of at most 500 characters.

    Example:
        >>> failure_line(ZeroDivisionError("float division by zero"))
        'ZeroDivisionError: float division by zero'
    """
    return one_line(e if isinstance(e, EvomergeError) else f"{type(e).__name__}: {e}")[:500]

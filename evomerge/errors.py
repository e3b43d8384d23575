"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing model, a wrong flag) is raised as an
:class:`EvomergeError`. The CLI prints its message as one line and exits with code 2, without a
traceback. Programming errors stay ordinary exceptions so that they keep their traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = [
    "EvomergeError",
    "ConfigError",
    "did_you_mean",
    "one_line",
    "failure_line",
    "hide_password",
]


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


# The password of `scheme://user:password@host...`, parsed as SQLAlchemy parses URLs (a username
# without `:` or `/`, a password without `@`), and of a `password=` query parameter.
_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://[^:/@\s]*:)([^@\s]*)(@)")
_QUERY = re.compile(r"([?&](?:password|passwd|pwd)=)([^&#\s]*)", re.IGNORECASE)
_MASK = "***"


def hide_password(text: str, url: str | None = None) -> str:
    """``text`` as it may be shown: the password of every URL in it masked, and every occurrence
    of ``url``'s password (as written or percent-decoded) too, for messages that quote a
    database driver. Use it on anything that may hold a storage URL before it is shown or logged.

    Example:
        >>> hide_password("cannot open postgresql://ann:s3cret@db:5432/evo")
        'cannot open postgresql://ann:***@db:5432/evo'
    """
    secrets: set[str] = set()
    for found in _USERINFO.finditer(url) if url else ():
        secrets.add(found.group(2))
    for found in _QUERY.finditer(url) if url else ():
        secrets.add(found.group(2))
    text = _USERINFO.sub(lambda m: m.group(1) + _MASK + m.group(3), text)
    text = _QUERY.sub(lambda m: m.group(1) + _MASK, text)
    for secret in sorted(secrets, key=len, reverse=True):
        for form in {secret, unquote(secret)}:
            if form:
                text = text.replace(form, _MASK)
    return text

"""Files: YAML in mergekit's style, files that appear whole or not at all, and names that become
path components."""

from __future__ import annotations

import gc
import io
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError

__all__ = [
    "atomic_file",
    "atomic_text",
    "dump_yaml",
    "read_yaml",
    "plain_name",
    "PLAIN_NAME",
    "MAX_YAML_BYTES",
]

# What a name that becomes one path component (and part of an SQLite URL) may be: no separator,
# no `.`/`..`, nothing hidden, no character that a URL or a shell would read.
PLAIN_NAME = re.compile(r"\w[\w.-]{0,127}")
_PLAIN_RULE = "a plain name: letters, digits, _ . - (not first: . -), at most 128 characters"


def plain_name(name: object, file: str | None, field: str) -> str:
    """``name`` when it may become one path component (a study's folder ``results/<name>``).

    Raises:
        ConfigError: a name that is not a string, or that would leave its folder (``../x``,
            ``/abs``, ``a/b``), is hidden (``.x``), empty or too long; the message names ``field``.

    Example:
        >>> plain_name("demo-2", None, "--study")
        'demo-2'
    """
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ConfigError(file, field, f"must be {_PLAIN_RULE}; got {name!r}")
    return name


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty temp file beside ``path``, opened for writing. Made with mode 0666 less the
    umask, as ``open`` makes files (``tempfile.mkstemp`` would make it 0600, and the rename keep it
    so); a file it replaces keeps that file's mode, as ``open(path, "w")`` would."""
    try:
        keep: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if keep is not None:
            try:
                os.fchmod(fd, keep)
            except (OSError, AttributeError):  # not ours to change (another owner), or no fchmod
                pass
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_file(path: Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file through ``write(f)`` into a temp file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never half of one. A new file gets the
    mode that ``open`` would give it (0666 less the umask); a replaced file keeps its mode.

    Returns:
        ``path``.

    Raises:
        OSError: the folder cannot be written (its ``filename`` is ``path``, not the temp file's).
    """
    try:
        fd, tmp = _create_beside(path)
    except OSError as e:
        raise _about(e, path) from None
    try:
        text = "b" not in mode
        with os.fdopen(
            fd, mode, encoding="utf-8" if text else None, newline="" if text else None
        ) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp), tmp):  # a full disk, say
            raise _about(e, path) from None
        raise
    return path


def _about(e: OSError, path: Path) -> OSError:
    """The same error, naming the file the caller asked for instead of a temp file."""
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, str(path))


def atomic_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_file(path, lambda f: f.write(text), mode="w")


class _FlowDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: Any, data: Sequence[Any]) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowDumper.add_representer(list, _represent_list)
_FlowDumper.add_representer(tuple, _represent_list)


def dump_yaml(data: Any) -> str:
    """YAML in mergekit's style: keys in insertion order, number lists inline."""
    out = io.StringIO()
    yaml.dump(
        data, out, Dumper=_FlowDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return out.getvalue()


# libyaml's loader when PyYAML has it: the pure-Python one takes seconds per megabyte.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Recipes and spaces are kilobytes; a file this large was named by mistake (and would take a minute).
MAX_YAML_BYTES = 16 * 10**6


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file.

    Raises:
        ConfigError: in one line, the file is missing or unreadable, larger than
            :data:`MAX_YAML_BYTES`, not UTF-8 text (a model file passed by mistake), or not
            well-formed YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), None, "file not found")
    try:
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(
                str(path),
                None,
                f"is {size / 1e6:.1f} MB, larger than any recipe or search space (at most {MAX_YAML_BYTES / 1e6:.0f} MB); is it the right file?",
            )
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            str(path),
            None,
            f"not a YAML text file (byte {e.start} is not UTF-8); is it a model or other binary file?",
        ) from None
    if "\x00" in text:
        raise ConfigError(
            str(path),
            None,
            "not a YAML text file (it holds NUL bytes); is it a model or other binary file?",
        )
    collecting = gc.isenabled()
    gc.disable()  # loading makes no garbage, only objects: the collector's passes over them tripled the time
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), None, f"malformed YAML: {where}{problem}") from None
    except RecursionError:
        raise ConfigError(
            str(path), None, "malformed YAML: nested too deeply to be a recipe or a space"
        ) from None
    finally:
        if collecting:
            gc.enable()

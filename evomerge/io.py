"""Files: YAML in mergekit's style, and files that appear whole or not at all."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError

__all__ = ["atomic_file", "atomic_text", "dump_yaml", "read_yaml"]


def atomic_file(path: Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write a file through ``write(f)`` into a temp file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never half of one.

    Returns:
        ``path``.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        text = "b" not in mode
        with os.fdopen(
            fd, mode, encoding="utf-8" if text else None, newline="" if text else None
        ) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file; a missing file or malformed YAML becomes a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), None, "file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), None, f"malformed YAML: {where}{problem}") from None

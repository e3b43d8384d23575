"""Where mergekit 0.1.5's tools are, for the optional comparison tests (``test_mergekit_*.py``).

A tool is looked for beside ``$EVOMERGE_MERGEKIT`` (the path of a ``mergekit-yaml``; its own path
for ``mergekit-yaml``), then in the repository's ``.venv-mk/bin/`` (where ``.ci/run`` installs
mergekit 0.1.5 in a venv of its own), then on PATH (not for ``python``: PATH's is not mergekit's).
Without it a comparison module is skipped, except under CI (``$CI`` set, not ``0``/``false``/``no``),
where it fails: the comparisons must run on every submission.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = ["IN_CI", "Tool", "find"]

LOCAL_BIN = Path(__file__).resolve().parents[1] / ".venv-mk" / "bin"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
INSTALL = "create it with `python3 -m venv .venv-mk && .venv-mk/bin/pip install torch==2.13.0 mergekit==0.1.5` or set EVOMERGE_MERGEKIT to its mergekit-yaml"


class Tool:
    """One of mergekit's executables: ``path`` (None when not found), ``missing`` (why, and how to
    install it), ``marks`` for a module's ``pytestmark`` and ``present``, an autouse fixture that
    fails the module under CI when the tool is missing."""

    def __init__(self, name: str, path: str | None) -> None:
        self.name, self.path = name, path
        env = os.environ.get("EVOMERGE_MERGEKIT")
        what, where = ("mergekit's python", "") if name == "python" else (name, ", none on PATH")
        self.missing = f"{what} not found (EVOMERGE_MERGEKIT={env!r}, {LOCAL_BIN / name} absent{where}): {INSTALL}"
        self.marks = [
            pytest.mark.mergekit,
            pytest.mark.slow,
            pytest.mark.skipif(path is None and not IN_CI, reason=self.missing),
        ]
        self.present: Callable[[], None] = pytest.fixture(scope="module", autouse=True)(
            self._present
        )

    def _present(self) -> None:
        if self.path is None:
            pytest.fail(f"CI is set but {self.missing}", pytrace=False)


def find(name: str) -> Tool:
    """Look for mergekit's ``name`` (``mergekit-yaml``, ``mergekit-moe`` or its ``python``), in the order
    of the module docstring."""
    env = os.environ.get("EVOMERGE_MERGEKIT")
    places = [Path(env) if name == "mergekit-yaml" else Path(env).with_name(name)] if env else []
    places.append(LOCAL_BIN / name)
    found = next((str(p) for p in places if p.is_file()), None)
    if found is None and name != "python":
        found = shutil.which(name)
    return Tool(name, found)

"""Session fixture: the micro zoo, built once per test run into a session temp dir.

conftest.py imports it with ``from _zoo_fixture import micro_zoo  # noqa: F401``, and marks every test
that uses it, directly or through another fixture, ``slow`` (left out by ``-m "not slow"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory) -> Path:
    """The micro zoo directory (``base/``, experts, ``tasks/``, ``zoo.json``), built once.

    ``EVOMERGE_ZOO_DIR`` is pointed at the session's zoo root so that ``zoo:micro/...`` references
    in spaces resolve to it. Set ``EVOMERGE_TEST_ZOO_DIR`` to reuse a zoo root across runs.
    """
    from evomerge.zoo import ensure_zoo

    root = Path(os.environ.get("EVOMERGE_TEST_ZOO_DIR") or tmp_path_factory.mktemp("zoo"))
    old = os.environ.get("EVOMERGE_ZOO_DIR")
    os.environ["EVOMERGE_ZOO_DIR"] = str(root)
    try:
        zoo = ensure_zoo("micro", root)
        yield zoo
    finally:
        if old is None:
            os.environ.pop("EVOMERGE_ZOO_DIR", None)
        else:
            os.environ["EVOMERGE_ZOO_DIR"] = old

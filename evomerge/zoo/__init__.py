"""The demo zoo: a tiny base model, fine-tuned experts with distinct skills, and lm-eval tasks.

``evomerge zoo`` builds it; model references ``zoo:<size>/<model>`` and the include path
``zoo:<size>`` build it on first use and reuse it afterwards (a version stamp in ``zoo.json``
decides when it must be rebuilt).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from evomerge.zoo.build import ZOO_VERSION, build_zoo, format_figures, is_current, read_manifest, zoo_lock
from evomerge.zoo.data import SKILLS, rewrite_task_yamls, task_names
from evomerge.zoo.train import SIZES

__all__ = ["ZOO_SIZES", "ZOO_VERSION", "SKILLS", "default_root", "ensure_zoo", "resolve_zoo_ref", "main_zoo", "read_manifest", "task_names"]

ZOO_SIZES: tuple[str, ...] = tuple(SIZES)


def default_root() -> Path:
    """``$EVOMERGE_ZOO_DIR`` if set, else ``results/zoo`` under the current directory."""
    env = os.environ.get("EVOMERGE_ZOO_DIR")
    return Path(env) if env else Path("results") / "zoo"


def _ensure_at(zoo_dir: Path, size: str, seed: int | None, *, progress: bool = True) -> Path:
    zoo_dir = Path(zoo_dir).resolve()
    if zoo_dir.is_dir() and any(zoo_dir.iterdir()) and not (zoo_dir / "zoo.json").is_file():
        from evomerge.errors import EvomergeError

        # A rebuild replaces the directory: never do that to something that is not a zoo.
        raise EvomergeError(f"{zoo_dir} exists and is not a zoo (no zoo.json); choose an empty or new directory")
    if not is_current(zoo_dir, size, seed):
        with zoo_lock(zoo_dir):
            # Another process may have built it while we waited for the lock.
            if not is_current(zoo_dir, size, seed):
                # Leftovers of a build that was killed (we hold the lock, so none is running).
                for stale in zoo_dir.parent.glob(f".{zoo_dir.name}.building-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                build_zoo(zoo_dir, size, 0 if seed is None else seed, progress=progress)
    _fix_task_paths(zoo_dir)
    return zoo_dir


def _fix_task_paths(zoo_dir: Path) -> None:
    """Task YAMLs name their JSONL by absolute path; rewrite them if the zoo was moved."""
    tasks = zoo_dir / "tasks"
    yamls = sorted(tasks.glob("*.yaml"))
    if yamls and str(tasks) not in yamls[0].read_text(encoding="utf-8"):
        with zoo_lock(zoo_dir):
            rewrite_task_yamls(tasks, tasks)


def ensure_zoo(size: str = "demo", root: str | Path | None = None) -> Path:
    """The directory of the ``size`` zoo, built first if missing or of another version.

    Args:
        size: "demo" or "micro".
        root: parent directory (default: :func:`default_root`); the zoo is ``<root>/<size>``.

    Returns:
        The zoo directory (``base/``, one dir per expert, ``tasks/``, ``zoo.json``).

    Raises:
        EvomergeError: unknown size.
    """
    if size not in SIZES:
        from evomerge.errors import EvomergeError, did_you_mean

        raise EvomergeError(f"unknown zoo size {size!r}" + did_you_mean(size, SIZES))
    root = Path(root) if root is not None else default_root()
    return _ensure_at(root / size, size, None)


def resolve_zoo_ref(ref: str) -> str | None:
    """Resolve ``zoo:<size>/<model>`` to a model directory and ``zoo:<size>`` to its tasks dir.

    Builds the zoo on first use. Returns None for an unknown size or model name.
    """
    if not ref.startswith("zoo:"):
        return None
    size, _, model = ref[len("zoo:"):].partition("/")
    if size not in SIZES:
        return None
    if model and model not in ("base", *SKILLS):
        return None
    zoo = ensure_zoo(size)
    return str(zoo / (model or "tasks"))


def main_zoo(out: str | None, size: str, seed: int) -> int:
    """The ``evomerge zoo`` verb: build (or reuse) a zoo and print its figures.

    Args:
        out: the zoo directory (default: ``<default_root()>/<size>``).
        size: "demo" or "micro".
        seed: seed of models and tasks; a zoo built with another seed is rebuilt.

    Returns:
        The exit code (0).
    """
    zoo_dir = Path(out) if out else default_root() / size
    t0 = time.perf_counter()
    fresh = not is_current(zoo_dir.resolve(), size, seed)
    zoo_dir = _ensure_at(zoo_dir, size, seed)
    manifest = read_manifest(zoo_dir) or {}
    print(f"zoo {size} (seed {seed}) at {zoo_dir}: " + ("built" if fresh else "up to date, reused") + f" in {time.perf_counter() - t0:.1f}s")
    print(f"models: {', '.join(manifest.get('models', {}))}; tasks: {', '.join(manifest['tasks']['search'] + manifest['tasks']['holdout'])}")
    print(format_figures(manifest))
    sys.stdout.flush()
    return 0

"""The demo zoo: a tiny base model, fine-tuned experts with distinct skills, and lm-eval tasks.

``evomerge zoo`` sets it up; model references ``zoo:<size>/<model>`` and the include path
``zoo:<size>`` set it up on first use and reuse it afterwards (a version stamp in ``zoo.json``
decides when it must be replaced). The demo zoo of seed 0 ships with the package (weights and
measured figures) and is installed, not trained; ``evomerge zoo --rebuild``, other seeds and the
micro size train with torch.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from evomerge.errors import EvomergeError, did_you_mean
from evomerge.zoo.build import (
    ZOO_VERSION,
    file_sha256,
    format_figures,
    install_zoo,
    is_current,
    read_manifest,
    shipped_manifest,
    zoo_lock,
)
from evomerge.zoo.data import SKILLS, rewrite_task_yamls, task_names
from evomerge.zoo.gentasks import (
    GEN_DIR,
    gen_task_names,
    has_gen_tasks,
    rewrite_gen_yamls,
    write_gen_tasks,
)
from evomerge.zoo.train import SIZES

__all__ = [
    "ZOO_SIZES",
    "ZOO_VERSION",
    "SKILLS",
    "default_root",
    "ensure_zoo",
    "resolve_zoo_ref",
    "main_zoo",
    "read_manifest",
    "zoo_kernel_env",
    "task_names",
    "gen_task_names",
]

ZOO_SIZES: tuple[str, ...] = tuple(SIZES)


def default_root() -> Path:
    """``$EVOMERGE_ZOO_DIR`` if set, else ``results/zoo`` under the current directory."""
    env = os.environ.get("EVOMERGE_ZOO_DIR")
    return Path(env) if env else Path("results") / "zoo"


def _ensure_at(
    zoo_dir: Path, size: str, seed: int | None, *, progress: bool = True, rebuild: bool = False
) -> Path:
    zoo_dir = Path(zoo_dir).resolve()
    try:
        return _ensure(zoo_dir, size, seed, progress=progress, rebuild=rebuild)
    except OSError as e:  # a folder that cannot be written (read-only, a file in the way, /proc...)
        where = e.filename or zoo_dir
        raise EvomergeError(
            f"zoo folder {zoo_dir}: cannot write there ({where}: {e.strerror or e}); choose another with --out or EVOMERGE_ZOO_DIR"
        ) from None


def _ensure(zoo_dir: Path, size: str, seed: int | None, *, progress: bool, rebuild: bool) -> Path:
    if zoo_dir.is_dir() and any(zoo_dir.iterdir()) and not (zoo_dir / "zoo.json").is_file():
        # A rebuild replaces the directory: never do that to something that is not a zoo.
        raise EvomergeError(
            f"{zoo_dir} exists and is not a zoo (no zoo.json); choose an empty or new directory"
        )
    if rebuild or not is_current(zoo_dir, size, seed):
        with zoo_lock(zoo_dir):
            # Another process may have set it up while we waited for the lock.
            if rebuild or not is_current(zoo_dir, size, seed):
                # Leftovers of a build that was killed (we hold the lock, so none is running).
                for stale in zoo_dir.parent.glob(f".{zoo_dir.name}.building-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                seed = 0 if seed is None else seed
                if not rebuild and shipped_manifest(size, seed) is not None:
                    install_zoo(zoo_dir, size, progress=progress)
                else:
                    _train_zoo(zoo_dir, size, seed, progress=progress)
    _fix_task_paths(zoo_dir)
    return zoo_dir


def _train_zoo(zoo_dir: Path, size: str, seed: int, *, progress: bool = True) -> None:
    """Train a zoo with :func:`build_zoo` in a child process with pinned CPU kernels.

    Float rounding in training depends on the kernels torch and MKL pick for the CPU's instruction
    set (AVX-512 and AVX2 kernels give different models from the same seed). On x86-64 the child
    runs torch's AVX2 kernels and MKL's AVX2 code path, those the shipped demo zoo was trained
    with, so that a rebuild rounds the same way on any x86-64 CPU with AVX2 (checked on an AVX-512
    AMD EPYC: bit-identical to the shipped weights). The variables are read once per process, when
    torch first runs a kernel, hence the child. A variable the user set is left as it is.
    """
    import subprocess

    code = (
        "import sys; from evomerge.zoo.build import build_main; sys.exit(build_main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, str(zoo_dir), size, str(seed), "1" if progress else "0"]
    rc = subprocess.run(cmd, env=zoo_kernel_env(), check=False).returncode
    if rc != 0:
        raise EvomergeError(
            f"building the {size} zoo failed (exit status {rc}; its error is printed above)"
        )


def zoo_kernel_env() -> dict[str, str]:
    """The environment of a child process that computes as the shipped zoo was computed.

    On x86-64, torch's AVX2 kernels and MKL's AVX2 code path (a variable the user set is left as
    it is); ``PYTHONPATH`` leads to this very evomerge, installed or not. The shipped weights and
    the figures in ``zoo.json`` were computed so; a child with this environment reproduces them on
    an AVX-512 CPU too, where the default kernels round differently.

    Returns:
        A copy of ``os.environ`` with those variables set.
    """
    import platform

    env = dict(os.environ)
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        env.setdefault("MKL_CBWR", "AVX2")
    src = str(Path(__file__).resolve().parents[2])  # the folder holding this evomerge package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _fix_task_paths(zoo_dir: Path) -> None:
    """Task YAMLs name their JSONL by absolute path; rewrite them if the zoo was moved. A zoo set
    up before the generation tasks existed gets them (their items are the existing ones)."""
    tasks = zoo_dir / "tasks"
    yamls = sorted(tasks.glob("*.yaml")) + sorted((tasks / GEN_DIR).glob("*.yaml"))
    if not has_gen_tasks(tasks) or any(
        str(tasks) not in y.read_text(encoding="utf-8") for y in yamls
    ):
        with zoo_lock(zoo_dir):
            rewrite_task_yamls(tasks, tasks)
            m = read_manifest(zoo_dir) or {}
            if has_gen_tasks(tasks):
                rewrite_gen_yamls(tasks, tasks)
            elif m.get("size") in SIZES and isinstance(m.get("seed"), int):
                shape = SIZES[m["size"]]
                write_gen_tasks(tasks, tasks, shape.n_search + shape.n_holdout, m["seed"])


def ensure_zoo(size: str = "demo", root: str | Path | None = None) -> Path:
    """The directory of the ``size`` zoo, set up first if missing or of another version: the
    shipped weights are installed where they exist (demo, seed 0), else the zoo is trained.

    Args:
        size: "demo" or "micro".
        root: parent directory (default: :func:`default_root`); the zoo is ``<root>/<size>``.

    Returns:
        The zoo directory (``base/``, one dir per expert, ``tasks/``, ``zoo.json``).

    Raises:
        EvomergeError: unknown size.
    """
    if size not in SIZES:
        raise EvomergeError(f"unknown zoo size {size!r}" + did_you_mean(size, SIZES))
    root = Path(root) if root is not None else default_root()
    return _ensure_at(root / size, size, None)


def resolve_zoo_ref(ref: str) -> str | None:
    """Resolve ``zoo:<size>/<model>`` to a model directory and ``zoo:<size>`` to its tasks dir.

    Builds the zoo on first use. Returns None for an unknown size or model name.
    """
    if not ref.startswith("zoo:"):
        return None
    size, _, model = ref[len("zoo:") :].partition("/")
    if size not in SIZES:
        return None
    if model and model not in ("base", *SKILLS):
        return None
    zoo = ensure_zoo(size)
    return str(zoo / (model or "tasks"))


def main_zoo(out: str | None, size: str, seed: int, rebuild: bool = False) -> int:
    """The ``evomerge zoo`` verb: install, build or reuse a zoo and print its figures.

    Args:
        out: the zoo directory (default: ``<default_root()>/<size>``).
        size: "demo" or "micro".
        seed: seed of models and tasks; a zoo of another seed is replaced.
        rebuild: train the zoo here even where its weights ship with evomerge (and even if the
            directory already holds it).

    Returns:
        The exit code (0).
    """
    zoo_dir = Path(out) if out else default_root() / size
    t0 = time.perf_counter()
    fresh = rebuild or not is_current(zoo_dir.resolve(), size, seed)
    zoo_dir = _ensure_at(zoo_dir, size, seed, rebuild=rebuild)
    manifest = read_manifest(zoo_dir) or {}
    source = manifest.get("source", "trained")
    how = (
        ("installed from the shipped weights" if source == "shipped" else "built (trained here)")
        if fresh
        else "up to date, reused"
    )
    print(f"zoo {size} (seed {seed}) at {zoo_dir}: {how} in {time.perf_counter() - t0:.1f}s")
    gen = gen_task_names(SKILLS)
    print(
        f"models: {', '.join(manifest.get('models', {}))}; tasks: {', '.join(manifest['tasks']['search'] + manifest['tasks']['holdout'])}; "
        f"generation tasks: {', '.join(gen[0] + gen[1])}"
    )
    shipped = shipped_manifest(size, seed)
    if source != "shipped" and shipped is not None:
        digests = {
            name: file_sha256(zoo_dir / info["dir"] / "model.safetensors")
            for name, info in manifest["models"].items()
        }
        if digests == shipped["shipped"]["digests"]:
            print("trained here; bit-identical to the shipped weights")
        else:
            print(
                "trained here; the tensors differ from the shipped weights (training rounds differently on other CPUs), "
                "so the figures below are this zoo's own, not the shipped zoo's; delete the directory to install the shipped zoo"
            )
    print(format_figures(manifest))
    sys.stdout.flush()
    return 0

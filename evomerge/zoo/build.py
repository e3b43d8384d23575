"""Building a zoo: pretrain the base, fine-tune one expert per skill, write tasks, measure figures.

A build happens in a temp directory next to the destination and is moved into place with
``os.replace`` only when complete, under a file lock so that two processes never build at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from evomerge.engine import merge_in_memory
from evomerge.errors import EvomergeError
from evomerge.evaluation import EvalConfig, TaskSpec
from evomerge.evaluation.lmeval import LMEvalEvaluator
from evomerge.moe import moe_in_memory
from evomerge.zoo.data import (
    SKILLS,
    eval_strings,
    make_tokenizer,
    pretrain_text,
    rewrite_task_yamls,
    skill_text,
    task_names,
    write_tasks,
)
from evomerge.zoo.gentasks import rewrite_gen_yamls, write_gen_tasks
from evomerge.zoo.train import SIZES, ZooSize, new_model, train

__all__ = [
    "ZOO_VERSION",
    "SHIPPED_DIR",
    "build_zoo",
    "install_zoo",
    "pack_zoo",
    "shipped_manifest",
    "file_sha256",
    "tasks_sha256",
    "zoo_lock",
    "read_manifest",
    "is_current",
    "format_figures",
    "measure_figures",
    "merge_recipe",
    "ZooScorer",
]

# Bump when the data, the models or the training change: existing zoos are then rebuilt.
ZOO_VERSION = "6"


def read_manifest(zoo_dir: Path) -> dict[str, Any] | None:
    """The parsed ``zoo.json`` of ``zoo_dir``, or None when absent or unreadable."""
    try:
        return json.loads((Path(zoo_dir) / "zoo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(zoo_dir: Path, size: str, seed: int | None = None) -> bool:
    """True when ``zoo_dir`` holds a complete zoo of this version, size (and seed, if given).

    A trained zoo without a ``source`` in its ``zoo.json`` (one an older evomerge trained) is not
    current where shipped weights exist for its size and seed: it is replaced by the shipped zoo. A zoo trained on purpose (``evomerge zoo --rebuild``) is kept.
    """
    m = read_manifest(zoo_dir)
    if not m or m.get("version") != ZOO_VERSION or m.get("size") != size:
        return False
    if seed is not None and m.get("seed") != seed:
        return False
    if "source" not in m and shipped_manifest(size, m.get("seed")) is not None:
        return False
    return all((Path(zoo_dir) / d / "model.safetensors").is_file() for d in m.get("models", {}))


# Zoos whose weights ship with the package: ``shipped/<size>/`` holds every model directory as
# built (config, tokenizer, ``model.safetensors``) and the build's ``zoo.json`` with its measured
# figures and the SHA-256 of every weight file and of the task items. Training is not
# bit-reproducible across CPUs (torch picks vectorized kernels, MKL its GEMM code path, by the
# instruction set: different rounding, different models), so the demo's figures are those of the
# shipped weights; ``evomerge zoo --rebuild`` trains them here instead.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tasks_sha256(tasks_dir: Path) -> str:
    """SHA-256 (hex) over the names and bytes of a zoo's task JSONL files (the YAMLs hold paths)."""
    h = hashlib.sha256()
    for path in sorted(Path(tasks_dir).glob("*.jsonl")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def shipped_manifest(size: str, seed: int | None = None) -> dict[str, Any] | None:
    """The manifest of the shipped ``size`` zoo, or None when none ships for this version (and seed)."""
    src = SHIPPED_DIR / size
    m = read_manifest(src)
    if not m or m.get("version") != ZOO_VERSION or m.get("size") != size or "shipped" not in m:
        return None
    if seed is not None and m.get("seed") != seed:
        return None
    if not all(
        (src / d["dir"] / "model.safetensors").is_file() for d in m.get("models", {}).values()
    ):
        return None
    return m


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` (if any) by the complete directory ``tmp``."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def install_zoo(dest: str | Path, size: str = "demo", *, progress: bool = True) -> dict[str, Any]:
    """Install the shipped ``size`` zoo into ``dest`` (no training): copy the weights, check their
    SHA-256, regenerate the task items from the seed and check theirs, write ``zoo.json``.

    Atomic like :func:`build_zoo` (temp dir, then ``os.replace``).

    Returns:
        The manifest written to ``zoo.json`` (the shipped one, with ``source: shipped``).

    Raises:
        EvomergeError: no shipped zoo of this version, or a file that does not match its digest.
    """
    shipped = shipped_manifest(size)
    if shipped is None:
        raise EvomergeError(
            f"evomerge ships no {size} zoo of version {ZOO_VERSION}; build it with `evomerge zoo --size {size} --rebuild`"
        )
    dest = Path(dest).resolve()
    src = SHIPPED_DIR / size
    t0 = time.perf_counter()
    tmp = dest.parent / f".{dest.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        digests = shipped["shipped"]["digests"]
        for name, info in shipped["models"].items():
            shutil.copytree(src / info["dir"], tmp / info["dir"])
            got = file_sha256(tmp / info["dir"] / "model.safetensors")
            if got != digests[name]:
                raise EvomergeError(
                    f"the shipped weights of zoo {size}/{name} do not match their digest (sha256 {got[:16]}..., expected {digests[name][:16]}...): "
                    f"reinstall evomerge, or train the zoo with `evomerge zoo --size {size} --rebuild`"
                )
        shape = SIZES[size]
        counts = write_tasks(
            tmp / "tasks", dest / "tasks", shape.n_search, shape.n_holdout, shipped["seed"]
        )
        write_gen_tasks(
            tmp / "tasks", dest / "tasks", shape.n_search + shape.n_holdout, shipped["seed"]
        )
        if (
            counts != shipped["tasks"]["items"]
            or tasks_sha256(tmp / "tasks") != shipped["shipped"]["tasks_sha256"]
        ):
            raise EvomergeError(
                f"the task items regenerated from seed {shipped['seed']} differ from those the shipped {size} zoo was measured on "
                f"(has Python's random module changed?); train the zoo here with `evomerge zoo --size {size} --rebuild`"
            )
        manifest = {
            **shipped,
            "source": "shipped",
            "install_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp, dest)
        if progress:
            print(
                f"[zoo {size}] installed the shipped weights in {manifest['install_seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_zoo(zoo_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Copy a built zoo into the package's ``shipped/<size>/`` (for maintainers, after a version bump).

    Copies every model directory and writes ``zoo.json`` with ``shipped``: the SHA-256 of every
    ``model.safetensors`` and of the task items, and the machine the zoo was built and measured on.
    Task files are not copied: :func:`install_zoo` regenerates them from the seed.

    Args:
        zoo_dir: a zoo built by :func:`build_zoo` (with figures).
        out: destination (default: ``SHIPPED_DIR/<size>``), replaced.

    Returns:
        The shipped manifest.
    """
    import platform

    zoo_dir = Path(zoo_dir)
    m = read_manifest(zoo_dir)
    if not m or "figures" not in m:
        raise ValueError(f"{zoo_dir} holds no zoo with measured figures")
    out = Path(out) if out is not None else SHIPPED_DIR / m["size"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for info in m["models"].values():
        shutil.copytree(zoo_dir / info["dir"], out / info["dir"])
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    m = {k: v for k, v in m.items() if k not in ("source", "install_seconds")}
    m["shipped"] = {
        "digests": {
            name: file_sha256(zoo_dir / info["dir"] / "model.safetensors")
            for name, info in m["models"].items()
        },
        "tasks_sha256": tasks_sha256(zoo_dir / "tasks"),
        "built_on": {
            "cpu": cpu,
            "machine": platform.machine(),
            "torch": torch.__version__,
            "cpu_capability": m["training"].get("cpu_capability")
            or torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": m["training"].get("mkl_cbwr", os.environ.get("MKL_CBWR")),
            "python": platform.python_version(),
        },
    }
    (out / "zoo.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
    return m


@contextmanager
def zoo_lock(zoo_dir: Path):
    """An exclusive advisory lock on ``<zoo_dir>.lock`` (blocks until the other builder is done)."""
    lock_path = Path(zoo_dir).parent / f".{Path(zoo_dir).name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (
            ImportError
        ):  # pragma: no cover - non-POSIX: no lock, the atomic rename still protects
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_UN)
            except ImportError:  # pragma: no cover
                pass


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _base_line(avoid: frozenset[str]):
    def line(rng) -> str:
        return pretrain_text(rng, avoid)

    return line


def _expert_line(skill: str, replay: float, avoid: frozenset[str]):
    """Training lines of one expert: its skill, with some of the base's mixture replayed so that the
    other formats stay where the base left them (small, mergeable deltas)."""

    def line(rng) -> str:
        return (
            pretrain_text(rng, avoid)
            if rng.random() < replay
            else skill_text(skill, rng, avoid=avoid)
        )

    return line


def merge_recipe(zoo_dir: Path, model_names: list[str], entry: Any) -> tuple[str, dict[str, Any]]:
    """The label and mergekit recipe of one merge-grid entry over all experts of a zoo.

    Args:
        zoo_dir: directory holding ``base/`` and the expert dirs.
        model_names: expert directory names, in the order of per-expert weights.
        entry: one task-arithmetic weight for every expert, a tuple with one weight per expert, or
            a dict ``{"method": ..., "weight": ..., other parameters}`` (the same for every expert).

    Returns:
        ``(label, recipe)``; the label names the method and weights, e.g.
        ``"task_arithmetic uniform 1/n"`` or ``"task_arithmetic rot=0.7 sort=0.6 shift=0.4"``.
    """
    method, extra = "task_arithmetic", {}
    if isinstance(entry, dict):  # another method with uniform parameters, e.g. TIES
        extra = {k: v for k, v in entry.items() if k != "method"}
        method, weights = entry["method"], [extra.pop("weight", 1.0)] * len(model_names)
    else:
        weights = list(entry) if isinstance(entry, tuple) else [entry] * len(model_names)
    recipe = {
        "merge_method": method,
        "base_model": str(Path(zoo_dir) / "base"),
        "models": [
            {"model": str(Path(zoo_dir) / n), "parameters": {"weight": w, **extra}}
            for n, w in zip(model_names, weights, strict=True)
        ],
        "dtype": "float32",
    }
    if isinstance(entry, dict):
        label = f"{method} uniform " + " ".join(
            f"{k}={v:g}" for k, v in {"weight": weights[0], **extra}.items()
        )
    elif isinstance(entry, tuple):
        label = "task_arithmetic " + " ".join(
            f"{n}={w:g}" for n, w in zip(model_names, weights, strict=True)
        )
    elif abs(entry - 1 / len(model_names)) < 1e-9:
        label = "task_arithmetic uniform 1/n"
    else:
        label = f"task_arithmetic uniform {entry:g}"
    return label, recipe


class ZooScorer:
    """lm-eval accuracy of a model on a zoo's search tasks and (optionally) its holdout tasks.

    Args:
        zoo_dir: directory holding ``base/`` (its tokenizer is used).
        tasks_dir: the lm-eval include dir (YAMLs must point at its JSONL files).
    """

    def __init__(self, zoo_dir: Path, tasks_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.search, self.holdout = task_names(SKILLS)
        cfg = EvalConfig(
            search=[TaskSpec(n) for n in self.search],
            holdout=[TaskSpec(n) for n in self.holdout],
            include_path=[str(Path(tasks_dir).resolve())],
            batch_size=64,
            file="zoo.json",
        )
        self._ev = LMEvalEvaluator(cfg, AutoTokenizer.from_pretrained(Path(zoo_dir) / "base"))
        self.seconds: list[float] = []  # of every search-task pass

    def score(self, model, holdout: bool = True) -> dict[str, float]:
        """``{task: acc, "mean": ..., [holdout tasks, "holdout_mean": ...]}``, rounded to 4 places."""
        r = self._ev.evaluate(model, "search")
        self.seconds.append(r.seconds)
        out = {k: round(v, 4) for k, v in r.scores.items()}
        out["mean"] = round(sum(out[n] for n in self.search) / len(self.search), 4)
        if holdout:
            out.update(
                {k: round(v, 4) for k, v in self._ev.evaluate(model, "holdout").scores.items()}
            )
            out["holdout_mean"] = round(sum(out[n] for n in self.holdout) / len(self.holdout), 4)
        return out


# The mixture of experts of the figures: gate_mode hidden, one expert per token, two prompts per expert.
MOE_PROMPTS = {
    "rot": ["rot: abcde =", "rot: vwxyz ="],
    "sort": ["sort: dbeca =", "sort: qzmxa ="],
    "shift": ["shift: abcde =", "shift: lmnop ="],
}
MOE_LABEL = "mixture of experts (hidden, 1 per token, 2 prompts each)"


def measure_figures(
    zoo_dir: Path, tasks_dir: Path, model_names: list[str], *, grid: tuple[Any, ...] = (1 / 3,)
) -> dict[str, Any]:
    """lm-eval accuracy (search and holdout items) of every model and of merges of all experts.

    Args:
        zoo_dir: directory holding ``base/`` and the expert dirs.
        tasks_dir: the lm-eval include dir (YAMLs must point at its JSONL files).
        model_names: expert directory names.
        grid: the merges to measure, entries as :func:`merge_recipe` takes them.

    Returns:
        ``{"models": {name: {task: acc}}, "merges": {label: {task: acc}}, "eval_seconds": s,
        "summary": {...}}``; the summary compares the best single expert, the uniform merges and
        the best merge with per-model weights.
    """
    from transformers import AutoModelForCausalLM

    scorer = ZooScorer(zoo_dir, tasks_dir)
    figures: dict[str, Any] = {"models": {}, "merges": {}}
    for name in ["base", *model_names]:
        model = AutoModelForCausalLM.from_pretrained(Path(zoo_dir) / name, dtype=torch.float32)
        figures["models"][name] = scorer.score(model)
    uniform: list[str] = []
    for entry in grid:
        label, recipe = merge_recipe(zoo_dir, model_names, entry)
        figures["merges"][label] = scorer.score(merge_in_memory(recipe))
        if not isinstance(entry, tuple):
            uniform.append(label)
    if set(model_names) <= set(
        MOE_PROMPTS
    ):  # search_spaces/demo_moe_mergekit.yml's configuration, built by evomerge moe
        experts = [
            {"source_model": str(Path(zoo_dir) / n), "positive_prompts": MOE_PROMPTS[n]}
            for n in model_names
        ]
        moe = {
            "base_model": str(Path(zoo_dir) / "base"),
            "gate_mode": "hidden",
            "experts_per_token": 1,
            "dtype": "float32",
            "experts": experts,
        }
        figures["moe"] = {MOE_LABEL: scorer.score(moe_in_memory(moe))}
    figures["eval_seconds"] = round(sum(scorer.seconds) / len(scorer.seconds), 3)
    figures["summary"] = _summary(figures, model_names, uniform)
    return figures


def _summary(figures: dict[str, Any], model_names: list[str], uniform: list[str]) -> dict[str, Any]:
    merges = figures["merges"]

    def best(names) -> str | None:
        return max(names, key=lambda n: merges[n]["mean"], default=None)

    expert = max(model_names, key=lambda n: figures["models"][n]["mean"])
    ties = next((n for n in uniform if n.startswith("ties uniform")), None)
    best_uniform, best_weighted = best(uniform), best([n for n in merges if n not in uniform])
    out: dict[str, Any] = {
        "best_expert": expert,
        "best_expert_mean": figures["models"][expert]["mean"],
        "best_expert_holdout_mean": figures["models"][expert]["holdout_mean"],
        "uniform_1n_mean": merges.get("task_arithmetic uniform 1/n", {}).get("mean"),
        "uniform_ties_mean": merges[ties]["mean"] if ties else None,
        "best_uniform": best_uniform,
        "best_merge": best(list(merges)),
        "best_merge_mean": merges[best(list(merges))]["mean"] if merges else None,
        "best_per_model": best_weighted,
    }
    if best_uniform and best_weighted:
        # How far per-model weights get above the best uniform merge: the room a search has.
        out["headroom"] = round(merges[best_weighted]["mean"] - merges[best_uniform]["mean"], 4)
        out["headroom_holdout"] = round(
            merges[best_weighted]["holdout_mean"] - merges[best_uniform]["holdout_mean"], 4
        )
    return out


def build_zoo(
    dest: str | Path,
    size: str = "demo",
    seed: int = 0,
    *,
    shape: ZooSize | None = None,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, Any]:
    """Build a zoo into ``dest`` atomically (temp dir, then ``os.replace``); returns its manifest.

    Args:
        dest: the zoo directory to create (replaced if it holds an older zoo).
        size: a key of :data:`SIZES` (also recorded in the manifest).
        seed: fixes model init, training data and task items.
        shape: override of the size's shape and budget (tests use a smaller one).
        progress: show tqdm bars and a line per stage on stderr.
        figures: measure accuracies with lm-eval (skipped by determinism tests).

    Returns:
        The manifest written to ``zoo.json``.
    """
    dest = Path(dest).resolve()
    shape = shape or SIZES[size]
    t0 = time.perf_counter()
    tmp = dest.parent / f".{dest.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def say(msg: str) -> None:
        if progress:
            print(f"[zoo {size}] {msg}", file=sys.stderr, flush=True)

    # A fixed thread count per size keeps the float reduction order (so the tensor hashes) the same
    # on any machine. One thread: two are faster on an idle 2-core machine but far slower as soon
    # as another process competes for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(shape.threads)
    try:
        tok = make_tokenizer()
        counts = write_tasks(tmp / "tasks", tmp / "tasks", shape.n_search, shape.n_holdout, seed)
        write_gen_tasks(tmp / "tasks", tmp / "tasks", shape.n_search + shape.n_holdout, seed)
        base = new_model(
            shape, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed
        )
        n_params = sum(p.numel() for p in base.parameters())
        say(f"pretraining the base ({n_params / 1e6:.2f}M parameters, {shape.base_steps} steps)")
        avoid = eval_strings(shape.n_search + shape.n_holdout, seed)
        train(
            base,
            tok,
            _base_line(avoid),
            steps=shape.base_steps,
            lr=shape.base_lr,
            batch=shape.batch,
            seed=seed * 1000 + 1,
            answer_only=shape.base_answer_only,
            progress="base" if progress else None,
        )
        _save(base, tok, tmp / "base")
        models: dict[str, dict[str, Any]] = {"base": {"dir": "base", "role": "base", "skill": None}}
        for i, skill in enumerate(SKILLS):
            expert = copy.deepcopy(base)
            train(
                expert,
                tok,
                _expert_line(skill, shape.replay, avoid),
                steps=shape.expert_steps,
                lr=shape.lr_for(skill),
                batch=shape.expert_batch or shape.batch,
                seed=seed * 1000 + 10 + i,
                answer_only=True,
                warmup=20,
                progress=skill if progress else None,
            )
            _save(expert, tok, tmp / skill)
            models[skill] = {"dir": skill, "role": "expert", "skill": skill}
            del expert
        train_seconds = time.perf_counter() - t0
        search, holdout = task_names(SKILLS)
        manifest: dict[str, Any] = {
            "version": ZOO_VERSION,
            "size": size,
            "seed": seed,
            "parameters": n_params,
            "models": models,
            "tasks": {
                "search": search,
                "holdout": holdout,
                "items": counts,
                "include_path": "tasks",
            },
            "training": {
                "base": {
                    "steps": shape.base_steps,
                    "lr": shape.base_lr,
                    "batch": shape.batch,
                    "answer_only": shape.base_answer_only,
                },
                "experts": {
                    s: {
                        "steps": shape.expert_steps,
                        "lr": shape.lr_for(s),
                        "batch": shape.expert_batch or shape.batch,
                        "replay": shape.replay,
                    }
                    for s in SKILLS
                },
                "threads": shape.threads,
                # The kernels the rounding depends on (see __init__._train_zoo).
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "mkl_cbwr": os.environ.get("MKL_CBWR"),
            },
            "train_seconds": round(train_seconds, 1),
            "source": "trained",
        }
        if figures:
            say("measuring accuracies with lm-eval")
            manifest["figures"] = measure_figures(
                tmp, tmp / "tasks", list(SKILLS), grid=shape.merge_grid
            )
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        rewrite_task_yamls(tmp / "tasks", dest / "tasks")
        rewrite_gen_yamls(tmp / "tasks", dest / "tasks")
        _move_into_place(tmp, dest)
        say(f"built in {manifest['build_seconds']:.0f}s")
        return manifest
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


def build_main(argv: list[str]) -> int:
    """Entry of the child process that trains a zoo: ``DEST SIZE SEED PROGRESS(0|1)``."""
    dest, size, seed, progress = argv
    build_zoo(dest, size, int(seed), progress=progress == "1")
    return 0


def format_figures(manifest: dict[str, Any]) -> str:
    """The figures table of a manifest: accuracy per task (search items) and the mean."""
    fig = manifest.get("figures")
    if not fig:
        return "(no figures measured)"
    search = manifest["tasks"]["search"]
    cols = [*search, "mean", "holdout_mean"]
    rows = (
        [(n, v) for n, v in fig["models"].items()]
        + [(n, v) for n, v in fig["merges"].items()]
        + list(fig.get("moe", {}).items())
    )
    width = max(len(n) for n, _ in rows)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>12}" for c in cols)]
    for name, v in rows:
        lines.append(
            f"{name:<{width}}  "
            + "  ".join(f"{100 * v[c]:>11.1f}%" if c in v else f"{'-':>12}" for c in cols)
        )
    sm = fig.get("summary", {})
    merges = fig["merges"]

    def pct(label: str) -> str:
        v = merges[label]
        return f"{100 * v['mean']:.1f}%" + (
            f" (holdout {100 * v['holdout_mean']:.1f}%)" if "holdout_mean" in v else ""
        )

    if sm:
        expert = fig["models"][sm["best_expert"]]
        lines.append(
            f"best single expert ({sm['best_expert']}): mean {100 * expert['mean']:.1f}%"
            + (
                f" (holdout {100 * expert['holdout_mean']:.1f}%)"
                if "holdout_mean" in expert
                else ""
            )
        )
        uniform = [n for n in merges if "uniform" in n]
        if uniform:
            lines.append("uniform merges: " + "; ".join(f"{n} {pct(n)}" for n in uniform))
        if sm.get("best_per_model"):
            line = f"best per-model weights measured ({sm['best_per_model']}): {pct(sm['best_per_model'])}"
            if "headroom" in sm:
                line += f", {100 * sm['headroom']:+.1f} points over the best uniform merge ({100 * sm['headroom_holdout']:+.1f} on holdout)"
            lines.append(line)
    lines.append(
        f"(accuracy on {manifest['tasks']['items'][search[0]]} search items per task; holdout_mean over the disjoint holdout tasks; chance is 25%)"
    )
    timing = f"one lm-eval pass over all search tasks: {fig['eval_seconds']:.2f}s; build time {manifest.get('build_seconds', 0):.0f}s"
    built_on = manifest.get("shipped", {}).get("built_on")
    if manifest.get("source") == "shipped" and built_on:
        timing += f" (where the shipped weights were trained and these figures measured: {built_on['cpu']}, torch {built_on['torch']} with its {built_on['cpu_capability']} kernels, one thread)"
    lines.append(timing)
    return "\n".join(lines)

"""Building a zoo: pretrain the base, fine-tune one expert per skill, write tasks, measure figures.

A build happens in a temp directory next to the destination and is moved into place with
``os.replace`` only when complete, under a file lock so that two processes never build at once.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from evomerge.zoo.data import SKILLS, eval_strings, make_tokenizer, pretrain_text, rewrite_task_yamls, skill_text, task_names, write_tasks
from evomerge.zoo.train import SIZES, ZooSize, new_model, train

__all__ = ["ZOO_VERSION", "build_zoo", "zoo_lock", "read_manifest", "is_current", "format_figures", "measure_figures"]

# Bump when the data, the models or the training change: existing zoos are then rebuilt.
ZOO_VERSION = "5"


def read_manifest(zoo_dir: Path) -> dict[str, Any] | None:
    """The parsed ``zoo.json`` of ``zoo_dir``, or None when absent or unreadable."""
    try:
        return json.loads((Path(zoo_dir) / "zoo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(zoo_dir: Path, size: str, seed: int | None = None) -> bool:
    """True when ``zoo_dir`` holds a complete zoo of this version, size (and seed, if given)."""
    m = read_manifest(zoo_dir)
    if not m or m.get("version") != ZOO_VERSION or m.get("size") != size:
        return False
    if seed is not None and m.get("seed") != seed:
        return False
    return all((Path(zoo_dir) / d / "model.safetensors").is_file() for d in m.get("models", {}))


@contextmanager
def zoo_lock(zoo_dir: Path):
    """An exclusive advisory lock on ``<zoo_dir>.lock`` (blocks until the other builder is done)."""
    lock_path = Path(zoo_dir).parent / f".{Path(zoo_dir).name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: no lock, the atomic rename still protects
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
        return pretrain_text(rng, avoid) if rng.random() < replay else skill_text(skill, rng, avoid=avoid)

    return line


def measure_figures(zoo_dir: Path, tasks_dir: Path, model_names: list[str], *, grid: tuple[Any, ...] = (1 / 3,)) -> dict[str, Any]:
    """lm-eval accuracy of every model and of task-arithmetic merges of all experts.

    Args:
        zoo_dir: directory holding ``base/`` and the expert dirs.
        tasks_dir: the lm-eval include dir (YAMLs must point at its JSONL files).
        model_names: expert directory names.
        grid: the merges to measure: one task-arithmetic weight for all experts, a tuple with one
            per expert, or a dict ``{"method": ..., "weight": ..., other parameters}`` (uniform).

    Returns:
        ``{"models": {name: {task: acc}}, "merges": {label: {task: acc}}, "eval_seconds": s}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.engine import merge_in_memory
    from evomerge.evaluate import LMEvalEvaluator, TaskSpec, EvalConfig

    search, holdout = task_names(SKILLS)
    cfg = EvalConfig(search=[TaskSpec(n) for n in search], holdout=[TaskSpec(n) for n in holdout], include_path=[str(Path(tasks_dir).resolve())], batch_size=64, file="zoo.json")
    tok = AutoTokenizer.from_pretrained(zoo_dir / "base")
    ev = LMEvalEvaluator(cfg, tok)
    secs: list[float] = []

    def score(model, with_holdout: bool = True) -> dict[str, float]:
        r = ev.evaluate(model, "search")
        secs.append(r.seconds)
        out = {k: round(v, 4) for k, v in r.scores.items()}
        out["mean"] = round(sum(out[n] for n in search) / len(search), 4)
        if with_holdout:  # the grid merges skip it: it only costs build time
            out.update({k: round(v, 4) for k, v in ev.evaluate(model, "holdout").scores.items()})
            out["holdout_mean"] = round(sum(out[n] for n in holdout) / len(holdout), 4)
        return out

    figures: dict[str, Any] = {"models": {}, "merges": {}}
    for name in ["base", *model_names]:
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / name, dtype=torch.float32)
        figures["models"][name] = score(model)
    for entry in grid:
        method, extra = "task_arithmetic", {}
        if isinstance(entry, dict):  # another method with uniform parameters, e.g. TIES
            extra = {k: v for k, v in entry.items() if k != "method"}
            method, weights = entry["method"], [extra.pop("weight", 1.0)] * len(model_names)
        else:
            weights = list(entry) if isinstance(entry, tuple) else [entry] * len(model_names)
        recipe = {
            "merge_method": method,
            "base_model": str(zoo_dir / "base"),
            "models": [{"model": str(zoo_dir / n), "parameters": {"weight": w, **extra}} for n, w in zip(model_names, weights)],
            "dtype": "float32",
        }
        if isinstance(entry, dict):
            label = f"{method} uniform " + " ".join(f"{k}={v:g}" for k, v in {"weight": weights[0], **extra}.items())
        elif isinstance(entry, tuple):
            label = "task_arithmetic " + " ".join(f"{n}={w:g}" for n, w in zip(model_names, weights))
        elif abs(entry - 1 / len(model_names)) < 1e-9:
            label = "task_arithmetic uniform 1/n"
        else:
            label = f"task_arithmetic uniform {entry:g}"
        uniform = isinstance(entry, dict) or label.endswith("1/n")
        figures["merges"][label] = score(merge_in_memory(recipe), with_holdout=uniform)
    figures["eval_seconds"] = round(sum(secs) / len(secs), 3)
    experts = {n: figures["models"][n]["mean"] for n in model_names}
    merges = {n: v["mean"] for n, v in figures["merges"].items()}
    best = max(merges, key=merges.__getitem__)
    figures["summary"] = {
        "best_expert": max(experts, key=experts.__getitem__),
        "best_expert_mean": max(experts.values()),
        "uniform_1n_mean": merges.get("task_arithmetic uniform 1/n"),
        "uniform_ties_mean": next((v for k, v in merges.items() if k.startswith("ties uniform")), None),
        "best_merge": best,
        "best_merge_mean": merges[best],
    }
    return figures


def build_zoo(dest: str | Path, size: str = "demo", seed: int = 0, *, shape: ZooSize | None = None, progress: bool = True, figures: bool = True) -> dict[str, Any]:
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
    # on any machine. One thread: two are faster on an idle 2-core machine but 20-50x slower as
    # soon as another process competes for the cores (measured), which is the common case here.
    threads = torch.get_num_threads()
    torch.set_num_threads(shape.threads)
    try:
        tok = make_tokenizer()
        counts = write_tasks(tmp / "tasks", tmp / "tasks", shape.n_search, shape.n_holdout, seed)
        base = new_model(shape, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed)
        n_params = sum(p.numel() for p in base.parameters())
        say(f"pretraining the base ({n_params / 1e6:.2f}M parameters, {shape.base_steps} steps)")
        avoid = eval_strings(shape.n_search + shape.n_holdout, seed)
        train(base, tok, _base_line(avoid), steps=shape.base_steps, lr=shape.base_lr, batch=shape.batch, seed=seed * 1000 + 1, answer_only=False, progress="base" if progress else None)
        _save(base, tok, tmp / "base")
        models: dict[str, dict[str, Any]] = {"base": {"dir": "base", "role": "base", "skill": None}}
        for i, skill in enumerate(SKILLS):
            expert = copy.deepcopy(base)
            train(expert, tok, _expert_line(skill, shape.replay, avoid), steps=shape.expert_steps, lr=shape.expert_lr, batch=shape.expert_batch or shape.batch, seed=seed * 1000 + 10 + i, answer_only=True, warmup=20, progress=skill if progress else None)
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
            "tasks": {"search": search, "holdout": holdout, "items": counts, "include_path": "tasks"},
            "training": {
                "base": {"steps": shape.base_steps, "lr": shape.base_lr, "batch": shape.batch},
                "experts": {"steps": shape.expert_steps, "lr": shape.expert_lr, "batch": shape.expert_batch or shape.batch, "replay": shape.replay},
                "threads": shape.threads,
            },
            "train_seconds": round(train_seconds, 1),
        }
        if figures:
            say("measuring accuracies with lm-eval")
            manifest["figures"] = measure_figures(tmp, tmp / "tasks", list(SKILLS), grid=shape.merge_grid)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        rewrite_task_yamls(tmp / "tasks", dest / "tasks")
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        say(f"built in {manifest['build_seconds']:.0f}s")
        return manifest
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


def format_figures(manifest: dict[str, Any]) -> str:
    """The figures table of a manifest: accuracy per task (search items) and the mean."""
    fig = manifest.get("figures")
    if not fig:
        return "(no figures measured)"
    search = manifest["tasks"]["search"]
    cols = [*search, "mean", "holdout_mean"]
    rows = [(n, v) for n, v in fig["models"].items()] + [(n, v) for n, v in fig["merges"].items()]
    width = max(len(n) for n, _ in rows)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>12}" for c in cols)]
    for name, v in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * v[c]:>11.1f}%" if c in v else f"{'-':>12}" for c in cols))
    sm = fig.get("summary", {})
    if sm:
        lines.append(f"best single expert ({sm['best_expert']}): mean {100 * sm['best_expert_mean']:.1f}%; best merge measured ({sm['best_merge']}): mean {100 * sm['best_merge_mean']:.1f}%")
        uniform = {"task arithmetic 1/n": sm.get("uniform_1n_mean"), "TIES": sm.get("uniform_ties_mean")}
        lines.append("uniform merges: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in uniform.items() if v is not None))
    lines.append(f"(accuracy on {manifest['tasks']['items'][search[0]]} search items per task; holdout_mean over the disjoint holdout tasks; chance is 25%)")
    lines.append(f"one lm-eval pass over all search tasks: {fig['eval_seconds']:.2f}s; build time {manifest.get('build_seconds', 0):.0f}s")
    return "\n".join(lines)

"""Benchmark the demo zoo: build time (fresh, in a temp dir), seconds per lm-eval call, and how far
per-model merge weights get above the uniform merges.

Usage:
    python bench/bench_zoo.py [--size demo|micro] [--zoo DIR] [--calls 5] [--threads 2]
    python bench/bench_zoo.py --zoo results/zoo/demo --weights 60 [--max-weight 1.5]

With ``--zoo`` an existing zoo is timed instead of building one. ``--weights N`` runs N TPE trials
(seed 0) over one task-arithmetic weight per expert, scored with lm-eval on the search items, and
re-scores the best three on the holdout items: this is how the per-model weights in the demo's
``merge_grid`` (evomerge/zoo/train.py) were found.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def search_weights(zoo: Path, manifest: dict, trials: int, max_weight: float) -> None:
    """TPE over per-expert task-arithmetic weights; prints the uniform merges and the best found."""
    import optuna

    from evomerge.engine import merge_in_memory
    from evomerge.zoo.build import ZooScorer, merge_recipe

    experts = [n for n, m in manifest["models"].items() if m["role"] == "expert"]
    scorer = ZooScorer(zoo, zoo / "tasks")

    def score(entry, holdout: bool = False) -> tuple[str, dict[str, float]]:
        label, recipe = merge_recipe(zoo, experts, entry)
        return label, scorer.score(merge_in_memory(recipe), holdout=holdout)

    def show(label: str, r: dict[str, float]) -> None:
        tasks = " ".join(f"{t.removeprefix('zoo_')} {100 * r[t]:.0f}" for t in scorer.search)
        hold = f", holdout mean {100 * r['holdout_mean']:.1f}" if "holdout_mean" in r else ""
        print(f"  {label}: mean {100 * r['mean']:.1f} ({tasks}){hold}", flush=True)

    print("uniform merges (search and holdout items):")
    for entry in (1 / len(experts), 1.0, {"method": "ties", "weight": 1.0, "density": 0.5}):
        show(*score(entry, holdout=True))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    t0 = time.perf_counter()
    study.optimize(
        lambda t: score(tuple(round(t.suggest_float(n, 0.0, max_weight), 2) for n in experts))[1][
            "mean"
        ],
        n_trials=trials,
    )
    print(
        f"{trials} TPE trials over per-model weights in [0, {max_weight:g}] (search items), {time.perf_counter() - t0:.0f}s; best three, re-scored with holdout:"
    )
    for t in sorted(study.trials, key=lambda t: -t.value)[:3]:
        show(*score(tuple(round(t.params[n], 2) for n in experts), holdout=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="demo", choices=["demo", "micro"])
    ap.add_argument("--zoo", default=None, help="time an existing zoo instead of building one")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--weights", type=int, default=0, help="trials of a per-model weight search (0: none)"
    )
    ap.add_argument("--max-weight", type=float, default=1.5)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation import parse_evaluate
    from evomerge.evaluation.lmeval import LMEvalEvaluator
    from evomerge.zoo.build import build_zoo, format_figures, read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        if args.zoo:
            zoo = Path(args.zoo)
        else:
            zoo = Path(tmp) / args.size
            t0 = time.perf_counter()
            build_zoo(zoo, args.size, 0)
            print(f"build ({args.size}, fresh): {time.perf_counter() - t0:.1f}s")
        manifest = read_manifest(zoo)
        print(format_figures(manifest))
        torch.set_num_threads(args.threads)
        if args.weights:
            search_weights(zoo, manifest, args.weights, args.max_weight)
            return
        cfg = parse_evaluate(
            {"include_path": str(zoo / "tasks"), "tasks": manifest["tasks"]["search"]},
            "bench",
            Path("."),
        )
        t0 = time.perf_counter()
        ev = LMEvalEvaluator(cfg, AutoTokenizer.from_pretrained(zoo / "base"), batch_size=64)
        print(f"evaluator setup (tasks built once): {time.perf_counter() - t0:.2f}s")
        model = AutoModelForCausalLM.from_pretrained(zoo / "base")
        secs = [ev.evaluate(model).seconds for _ in range(args.calls)]
        n = sum(manifest["tasks"]["items"][t] for t in manifest["tasks"]["search"])
        print(
            f"lm-eval over all search tasks ({n} items, {args.threads} threads): median {statistics.median(secs):.2f}s, min {min(secs):.2f}s over {len(secs)} calls"
        )


if __name__ == "__main__":
    main()

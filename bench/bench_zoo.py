"""Benchmark the demo zoo: build time (fresh, in a temp dir) and seconds per lm-eval call.

Usage:
    python bench/bench_zoo.py [--size demo|micro] [--zoo DIR] [--calls 5] [--threads 2]

With ``--zoo`` an existing zoo is timed instead of building a fresh one.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="demo", choices=["demo", "micro"])
    ap.add_argument("--zoo", default=None, help="time an existing zoo instead of building one")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import LMEvalEvaluator, parse_evaluate
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
        cfg = parse_evaluate({"include_path": str(zoo / "tasks"), "tasks": manifest["tasks"]["search"]}, "bench", Path("."))
        t0 = time.perf_counter()
        ev = LMEvalEvaluator(cfg, AutoTokenizer.from_pretrained(zoo / "base"), batch_size=64)
        print(f"evaluator setup (tasks built once): {time.perf_counter() - t0:.2f}s")
        model = AutoModelForCausalLM.from_pretrained(zoo / "base")
        secs = [ev.evaluate(model).seconds for _ in range(args.calls)]
        n = sum(manifest["tasks"]["items"][t] for t in manifest["tasks"]["search"])
        print(f"lm-eval over all search tasks ({n} items, {args.threads} threads): median {statistics.median(secs):.2f}s, min {min(secs):.2f}s over {len(secs)} calls")


if __name__ == "__main__":
    main()

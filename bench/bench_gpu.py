"""Benchmark: the search's merge path at scale (issue 11's table), on ``--device cuda`` or ``cpu``.

One prepared script for a short GPU session (< 8 minutes on an H100 at the default ~1.2B size,
models built on the first run); on a CPU at a small size it checks the same code paths. Prints:

1. placement: the byte accounting for four Mistral-7B-shaped bf16 sources on an 80 GB card (by
   construction), and the placement this run's merger chose for its own sources;
2. copy rate of the device (``Tensor.copy_`` of 1 GiB, read + write counted);
3. per method: first merge and best re-merge into a resident model (new weights and density each
   time), against the floor: a plain in-place weighted sum of the same four tensors held in
   float32 (the issue's floor) and of the tensors as held (bf16); GB/s moved against the copy rate;
4. peak device memory per placement (sources on the device; sources in pinned host memory,
   streamed each merge) with the re-merge time of each;
5. the merge share of a trial: a re-merge with its per-trial hash (fingerprint on CUDA) against
   an evaluation stand-in (a forward pass over ``--eval-tokens`` tokens: a real lm-eval trial
   reads more, so the share printed is an upper bound);
6. CUDA only: digests of disk merges on CPU and CUDA for the random methods, slerp and ties on
   small models (equal bits expected);
7. disk merges: ``evomerge merge --device D`` (fresh process) for TIES and linear, against
   ``mergekit-yaml [--cuda]`` when ``--mergekit`` is given.

Usage::

    python bench/bench_gpu.py --device cuda                      # ~1.2B Llama shapes (4 x 2.4 GB bf16)
    python bench/bench_gpu.py --device cuda --mergekit "$(which mergekit-yaml)"
    python bench/bench_gpu.py --device cpu                       # ~25M shapes, the same rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_merge import build_models, run_child  # noqa: E402

__all__ = ["main"]

SIZES = {
    "cuda": dict(hidden=2048, intermediate=8192, layers=16, vocab=32000),
    "cpu": dict(hidden=512, intermediate=1408, layers=8, vocab=8000),
}
REMERGE = ("linear", "task_arithmetic", "slerp", "ties", "dare_ties", "dare_linear")
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_rate(dev: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second moved (read + written) by ``dst.copy_(src)`` on the device."""
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def recipe(
    method: str, dirs: list[Path], density: float, weights: tuple[float, float, float]
) -> dict[str, Any]:
    base, ft = str(dirs[0]), [str(d) for d in dirs[1:]]
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": ft[0]}],
            "parameters": {"t": weights[0]},
            "dtype": "bfloat16",
        }
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in zip(ft, weights, strict=False)
            ],
            "dtype": "bfloat16",
        }
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    dens = {} if method == "task_arithmetic" else {"density": density}
    return {
        "merge_method": method,
        "base_model": base,
        "dtype": "bfloat16",
        "models": [{"model": base}]
        + [
            {"model": m, "parameters": {"weight": w, **dens, **extra}}
            for m, w in zip(ft, weights, strict=False)
        ],
    }


TRIALS = [
    (0.5, (0.5, 0.3, 0.2)),
    (0.4, (0.2, 0.5, 0.3)),
    (0.7, (0.3, 0.3, 0.4)),
    (0.3, (0.6, 0.2, 0.2)),
]


def _timed(dev: torch.device, fn: Any) -> tuple[float, Any]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return time.perf_counter() - t0, out


def resident_bench(
    dirs: list[Path],
    dev: torch.device,
    rate: float,
    repeat: int,
    gpu_memory: str | None = None,
    methods: tuple[str, ...] = REMERGE,
) -> dict[str, Any]:
    """First merge and re-merges per method into one resident model; the floors; peak memory."""
    from evomerge.engine import Merger, open_sources
    from evomerge.recipe.schema import load_recipe

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    merger = Merger(
        open_sources([str(d) for d in dirs]),
        device=dev,
        seed=0,
        resident=True,
        gpu_memory=gpu_memory,
    )
    assert merger.placement is not None
    res: dict[str, Any] = {
        "placement": merger.placement.where,
        "placement_line": merger.placement.describe(),
    }
    plan0 = merger.plan(load_recipe(recipe("linear", dirs, *TRIALS[0])))
    model = merger.build_model(plan0)
    ties_tasks = merger.plan(load_recipe(recipe("ties", dirs, *TRIALS[0]))).tasks
    res["load_s"], _ = _timed(
        dev, lambda: [merger._load(r, n, torch.float32) for t in ties_tasks for r, n in t.inputs]
    )
    # bytes a 4-input re-merge moves: the inputs as held, the bf16 output
    moved = sum(merger.sources[r].nbytes(n) for t in ties_tasks for r, n in t.inputs) + sum(
        merger.sources[t.inputs[0][0]].nbytes(t.inputs[0][1]) for t in ties_tasks
    )
    res["bytes_moved"] = moved
    for method in methods:
        plans = [merger.plan(load_recipe(recipe(method, dirs, d, w))) for d, w in TRIALS]
        first, _ = _timed(dev, lambda p=plans[0]: merger.merge_into(model, p, digest=False))
        times = [
            _timed(dev, lambda p=p: merger.merge_into(model, p, digest=False))[0]
            for p in plans[1 : 1 + repeat]
        ]
        # this method's bytes: its inputs as held (2 for slerp, 3 for linear, 4 for the rest) and the bf16 output
        m_moved = sum(
            merger.sources[r].nbytes(n) for t in plans[1].tasks for r, n in t.inputs
        ) + sum(int(torch.Size(t.shape).numel()) * 2 for t in plans[1].tasks)
        res[method] = {
            "first_s": first,
            "remerge_s": min(times),
            "gbps": m_moved / min(times) / 1e9,
        }
        print(
            f"  {res['placement']:6s} {method:15s} first {first:7.2f} s   re-merge best {min(times):7.3f} s  ({m_moved / min(times) / 1e9:7.1f} GB/s, {m_moved / min(times) / rate:5.1%} of copy)",
            flush=True,
        )
    if res["placement"] != "host":
        held = [
            [merger._load(ref, name, torch.float32) for ref, name in t.inputs] for t in ties_tasks
        ]
        w = (0.4, 0.3, 0.2, 0.1)
        targets = dict(model.state_dict(keep_vars=True))
        names = [t.out_name for t in ties_tasks]

        def wsum(xss: list[list[torch.Tensor]]) -> None:
            with torch.no_grad():
                for name, xs in zip(names, xss, strict=False):
                    buf = (
                        torch.mul(xs[0], w[0], out=scratch[: xs[0].numel()].view(xs[0].shape))
                        if xs[0].dtype == torch.float32
                        else xs[0].float().mul_(w[0])
                    )
                    for x, wi in zip(xs[1:], w[1:], strict=False):
                        buf.add_(x, alpha=wi)
                    targets[name].data.copy_(buf)

        biggest = max(xs[0].numel() for xs in held)
        scratch = torch.empty(biggest, device=dev)
        res["floor_held_s"] = min(_timed(dev, lambda: wsum(held))[0] for _ in range(repeat))
        f32 = [[x.float() for x in xs] for xs in held]
        res["floor_f32_s"] = min(_timed(dev, lambda: wsum(f32))[0] for _ in range(repeat))
        res["bytes_f32"] = sum(x.numel() * 4 for xs in f32 for x in xs) + sum(
            xs[0].numel() * 2 for xs in f32
        )
        del f32, held
        print(
            f"  floor: weighted sum of the four tensors in float32 {res['floor_f32_s']:.3f} s ({res['bytes_f32'] / res['floor_f32_s'] / 1e9:.1f} GB/s); "
            f"of the tensors as held {res['floor_held_s']:.3f} s",
            flush=True,
        )
    if dev.type == "cuda":
        res["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    res["trial"] = trial_share(merger, model, plans[-1], dev)
    return res


def trial_share(
    merger: Any, model: Any, plan: Any, dev: torch.device, eval_tokens: int | None = None
) -> dict[str, float]:
    """A trial's merge (with its per-trial hash) against an evaluation stand-in."""
    tokens = eval_tokens or ARGS_EVAL_TOKENS
    merge_s, r = _timed(dev, lambda: merger.merge_into(model, plan))
    batch, seq = 8, 512
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    with torch.no_grad():
        model(ids[:1, :16])  # warm-up
        eval_s, _ = _timed(
            dev, lambda: [model(ids) for _ in range(max(1, tokens // (batch * seq)))]
        )
    share = merge_s / (merge_s + eval_s)
    print(
        f"  trial: merge + {merger.digest_kind} {merge_s:.3f} s, eval stand-in ({tokens} tokens forward) {eval_s:.2f} s: merge share {share:.1%} (target <= 5% on GPU)",
        flush=True,
    )
    return {"merge_s": merge_s, "eval_s": eval_s, "share": share}


ARGS_EVAL_TOKENS = 1 << 18


def cross_device_digests(work: Path) -> dict[str, bool]:
    """CPU vs CUDA disk merges of small models: equal sha256 per method."""
    from evomerge.engine import merge_to_disk

    dirs = build_models(work / "small_models", hidden=256, inter=704, layers=4, vocab=4000)
    same = {}
    for method in (*RANDOM, "slerp", "ties", "linear"):
        r = recipe(method, dirs, 0.5, (0.5, 0.3, 0.2))
        a = merge_to_disk(r, work / f"x_{method}_cpu", device="cpu", force=True, fingerprint=True)
        b = merge_to_disk(r, work / f"x_{method}_cuda", device="cuda", force=True, fingerprint=True)
        same[method] = a.digest == b.digest and a.fingerprint == b.fingerprint
        print(
            f"  {method:13s} CPU vs CUDA digest {'equal' if same[method] else 'DIFFERENT'}",
            flush=True,
        )
    return same


def disk_bench(
    dirs: list[Path], dev: torch.device, work: Path, mergekit: str | None
) -> dict[str, Any]:
    from evomerge.io import dump_yaml

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    out: dict[str, Any] = {}
    for method in ("ties", "linear"):
        f = work / f"disk_{method}.yml"
        f.write_text(dump_yaml(recipe(method, dirs, 0.5, (0.5, 0.3, 0.2))))
        row: dict[str, Any] = {}
        cmds = [
            (
                "evomerge",
                [
                    sys.executable,
                    "-m",
                    "evomerge.cli",
                    "merge",
                    str(f),
                    str(work / f"{method}_em"),
                    "--force",
                    "--device",
                    str(dev),
                ],
            )
        ]
        if mergekit:
            cmds.append(
                (
                    "mergekit",
                    [
                        mergekit,
                        str(f),
                        str(work / f"{method}_mk"),
                        "--no-copy-tokenizer",
                        "--quiet",
                        *(["--cuda"] if dev.type == "cuda" else []),
                    ],
                )
            )
        for tool, cmd in cmds:
            shutil.rmtree(work / f"{method}_{tool[:2]}", ignore_errors=True)
            wall, rss, rc, tail = run_child(cmd, env)
            row[tool] = wall if rc == 0 else None
            print(
                f"  disk {method:7s} {tool:9s} {wall:7.1f} s (exit {rc})"
                + (f": {tail}" if rc else ""),
                flush=True,
            )
        if row.get("evomerge") and row.get("mergekit"):
            row["ratio"] = row["evomerge"] / row["mergekit"]
            print(
                f"  disk {method:7s} evomerge / mergekit = {row['ratio']:.2f}x (target <= 0.25x for TIES)",
                flush=True,
            )
        out[method] = row
    return out


def main(argv: list[str] | None = None) -> int:
    global ARGS_EVAL_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    ap.add_argument("--cache", default=str(REPO / "results" / "bench_models"))
    ap.add_argument("--work", default=str(REPO / "results" / "bench_gpu"))
    for k in ("hidden", "intermediate", "layers", "vocab"):
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--eval-tokens",
        type=int,
        default=1 << 18,
        help="tokens of the evaluation stand-in's forward passes",
    )
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml binary for the disk comparison")
    ap.add_argument("--skip-disk", action="store_true")
    ap.add_argument("--skip-host", action="store_true", help="skip the pinned-host placement run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ARGS_EVAL_TOKENS = args.eval_tokens
    dev = torch.device(args.device)
    size = {
        k: getattr(args, k) if getattr(args, k) is not None else v
        for k, v in SIZES[dev.type].items()
    }
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dirs = build_models(
        Path(args.cache),
        hidden=size["hidden"],
        inter=size["intermediate"],
        layers=size["layers"],
        vocab=size["vocab"],
    )
    from evomerge.engine import open_sources
    from evomerge.engine.placement import choose_placement

    src = open_sources([str(dirs[0])])[str(dirs[0])]
    params = sum(src.nbytes(n) for n in src.names()) // 2
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "params_per_model": params,
        "size": size,
    }
    print(
        f"device {figures['device']}; 4 models of {params / 1e9:.3f}B parameters (bf16); built in {time.perf_counter() - t_start:.0f} s",
        flush=True,
    )
    one = 2 * 7_241_732_096
    seven = choose_placement(4 * one, one, 79 << 30)
    print(
        f"by construction, four Mistral-7B bf16 sources on an 80 GB card (79 GiB free): {seven.describe()}",
        flush=True,
    )
    rate = copy_rate(dev)
    figures["copy_rate"] = rate
    print(f"copy rate: {rate / 1e9:.1f} GB/s (read + write)", flush=True)
    figures["device_placement"] = resident_bench(dirs, dev, rate, args.repeat)
    print(f"  {figures['device_placement']['placement_line']}", flush=True)
    if dev.type == "cuda" and not args.skip_host:
        figures["host_placement"] = resident_bench(
            dirs,
            dev,
            rate,
            min(2, args.repeat),
            gpu_memory="1M",
            methods=("linear", "ties", "dare_ties"),
        )
        print(
            f"  peak GPU memory: sources on the device {figures['device_placement']['peak_bytes'] / 2**30:.2f} GiB, "
            f"streamed from pinned host memory {figures['host_placement']['peak_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
        figures["cross_device"] = cross_device_digests(work)
    if not args.skip_disk:
        figures["disk"] = disk_bench(dirs, dev, work, args.mergekit)
    d = figures["device_placement"]
    if "floor_f32_s" in d:
        print("\nmethod            re-merge   / floor(f32)   / floor(held)   first merge")
        for m in REMERGE:
            print(
                f"{m:15s} {d[m]['remerge_s']:9.3f} s {d[m]['remerge_s'] / d['floor_f32_s']:10.2f}x {d[m]['remerge_s'] / d['floor_held_s']:12.2f}x {d[m]['first_s']:10.2f} s"
            )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does `evomerge merge` stream? Peak anonymous memory against model size.

A merge that streams holds a few tensors at a time (sources are memory-mapped, shards are written
tensor by tensor), so the memory it owns does not grow with the model: file-backed pages of the
memory-mapped sources count in RSS but the kernel can drop them at any time, which is what lets a
model larger than free RAM merge. This runs the same TIES recipe over Llama-shaped bf16 models of
increasing depth (same largest tensor) in fresh processes and samples ``RssAnon`` (memory the process
owns) and ``RssFile`` (mapped file pages) from ``/proc/<pid>/status`` every 20 ms.

    python bench/bench_stream.py                     # 8, 16 and 32 layers (1.1-4.3 GB of inputs)
    python bench/bench_stream.py --layers 4 8        # quicker
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import REPO, _write_recipe, build_models, recipes  # noqa: E402


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int, int]:
    """Run ``cmd``; return (wall s, exit code, peak RssAnon MiB, peak RssFile MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = file = 0
    while proc.poll() is None:
        s = _status_kib(proc.pid)
        anon, file = max(anon, s.get("RssAnon", 0)), max(file, s.get("RssFile", 0))
        time.sleep(0.02)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        print(err.strip().splitlines()[-1] if err.strip() else "failed", file=sys.stderr)
    return time.perf_counter() - start, proc.returncode, anon // 1024, file // 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(REPO / "results" / "bench_models"))
    ap.add_argument("--work", default=str(REPO / "results" / "bench_runs"))
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--shard", default="500MB", help="--out-shard-size of the merges")
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{'layers':>6} {'inputs GB':>9} {'output GB':>9} {'wall s':>7} {'peak RssAnon MiB':>17} {'peak RssFile MiB':>17}"
    )
    for layers in args.layers:
        dirs = build_models(Path(args.cache), hidden=1024, inter=2816, layers=layers, vocab=32000)
        recipe = _write_recipe(work / f"stream_ties_l{layers}.yml", recipes(dirs)["ties"])
        out = work / f"stream_ties_l{layers}"
        cmd = [
            sys.executable,
            "-m",
            "evomerge.cli",
            "merge",
            str(recipe),
            str(out),
            "--force",
            "--out-shard-size",
            args.shard,
        ]
        wall, code, anon, file = run_sampled(cmd, env)
        inputs = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
        output = sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.is_dir() else 0
        print(
            f"{layers:>6} {inputs / 1e9:>9.2f} {output / 1e9:>9.2f} {wall:>7.1f} {anon:>17} {file:>17}"
            + ("" if code == 0 else f"  (exit {code})"),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

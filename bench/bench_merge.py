"""Benchmark: evomerge's merge engine against ``mergekit-yaml`` on ~270M-parameter Llama-shaped models.

What it measures (and prints as a table):

1. Disk merges, each in a fresh subprocess, for evomerge (``python -m evomerge.cli merge``) and
   mergekit (``mergekit-yaml``) on the same recipes and the same model directories: wall time,
   peak RSS of the child (``os.wait4`` rusage), and the ratio evomerge / mergekit.
   Recipes: TIES (base + 3 models, density 0.5), SLERP with per-filter t gradients, linear (3 models).
2. In-memory re-merge into a resident model (the search's path, :meth:`Merger.merge_into`) for
   TIES and DARE-TIES, after one warm-up merge, against a plain in-place weighted sum of the same
   resident tensors written into the same model (the memory-bound floor).
3. Bytes moved per second (inputs read + output written) for each of them, against this
   machine's memory-copy rate (``Tensor.copy_`` of a 512 MiB buffer, read + write counted).

Models are random-initialised (base: N(0, 0.02); fine-tunes: base + N(0, 0.002)), saved in bf16
under ``--cache`` (default ``results/bench_models``, git-ignored) and reused across runs.

Usage::

    python bench/bench_merge.py                      # everything (several minutes on 2 cores)
    python bench/bench_merge.py --skip-mergekit      # evomerge only
    python bench/bench_merge.py --layers 2 --vocab 4000 --only ties   # a quick smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

__all__ = ["build_models", "run_child", "memcpy_rate", "main"]


def _llama_tensors(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_models(
    cache: Path, *, hidden: int, inter: int, layers: int, vocab: int, n_ft: int = 3
) -> list[Path]:
    """Write base + ``n_ft`` perturbed copies (bf16 safetensors) under ``cache``; reuse them if present.

    Returns:
        ``[base, ft1, ..., ftN]`` directories.
    """
    from safetensors.torch import save_file

    tag = f"llama_h{hidden}_i{inter}_l{layers}_v{vocab}"
    root = cache / tag
    dirs = [root / "base"] + [root / f"ft{i + 1}" for i in range(n_ft)]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs
    shapes = _llama_tensors(hidden, inter, layers, vocab)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        if name.endswith("norm.weight"):
            t += 1.0
        base[name] = t.to(torch.bfloat16)
    for k, d in enumerate(dirs):
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if k == 0:
            tensors = base
        else:
            tensors = {
                n: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(torch.bfloat16)
                for n, t in base.items()
            }
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        del tensors
    return dirs


def recipes(dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """The benchmark recipes over ``[base, ft1, ft2, ft3]`` (absolute paths)."""
    base, ft = str(dirs[0]), [str(d) for d in dirs[1:]]
    return {
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": base}]
            + [
                {"model": m, "parameters": {"density": 0.5, "weight": w}}
                for m, w in zip(ft, (0.5, 0.3, 0.2), strict=False)
            ],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, _layers(dirs[0])]},
                        {"model": ft[0], "layer_range": [0, _layers(dirs[0])]},
                    ]
                }
            ],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "bfloat16",
        },
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip(ft, (0.5, 0.3, 0.2), strict=False)
            ],
            "dtype": "bfloat16",
        },
    }


def _layers(d: Path) -> int:
    return int(json.loads((d / "config.json").read_text())["num_hidden_layers"])


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, str]:
    """Run ``cmd`` in a fresh process.

    The peak RSS is read by ``/usr/bin/time -f %M`` when it exists: a small launcher, so the
    figure is the command's own (a child forked straight from this process would inherit this
    process's high-water mark across ``exec``). Otherwise ``os.wait4`` rusage is used.

    Returns:
        ``(wall seconds, peak RSS in MiB of the command, exit code, last lines of its output)``.
    """
    marker = "@@maxrss_kib="
    use_time = Path("/usr/bin/time").is_file()
    full = ["/usr/bin/time", "-f", marker + "%M", *cmd] if use_time else cmd
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    rss_kib = float(usage.ru_maxrss)
    lines = out.strip().splitlines()
    if use_time:
        found = [ln for ln in lines if ln.startswith(marker)]
        if found:
            rss_kib = float(found[-1][len(marker) :])
        lines = [ln for ln in lines if not ln.startswith(marker)]
    return wall, rss_kib / 1024, code, "\n".join(lines[-3:])


def memcpy_rate(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Bytes per second moved (read + written) by ``dst.copy_(src)`` on a large CPU buffer."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def _write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    from evomerge.io import dump_yaml

    path.write_text(dump_yaml(recipe))
    return path


def disk_bench(
    dirs: list[Path], work: Path, names: list[str], mergekit: str | None, rate: float
) -> list[dict[str, Any]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    rows = []
    all_recipes = recipes(dirs)
    for name in names:
        recipe_file = _write_recipe(work / f"{name}.yml", all_recipes[name])
        in_bytes = sum(
            (Path(m["model"]) / "model.safetensors").stat().st_size
            for m in _inputs(all_recipes[name])
        )
        row: dict[str, Any] = {"recipe": name}
        tools = [
            (
                "evomerge",
                [
                    sys.executable,
                    "-m",
                    "evomerge.cli",
                    "merge",
                    str(recipe_file),
                    str(work / f"{name}_evomerge"),
                    "--force",
                ],
            )
        ]
        if mergekit:
            tools.append(
                (
                    "mergekit",
                    [
                        mergekit,
                        str(recipe_file),
                        str(work / f"{name}_mergekit"),
                        "--no-copy-tokenizer",
                        "--quiet",
                        "--no-write-model-card",
                    ],
                )
            )
        for tool, cmd in tools:
            shutil.rmtree(work / f"{name}_{tool}", ignore_errors=True)
            wall, rss, rc, tail = run_child(cmd, env)
            if rc != 0:
                print(f"[{tool} {name}] failed (exit {rc}):\n{tail}", file=sys.stderr)
            out_bytes = sum(
                f.stat().st_size for f in (work / f"{name}_{tool}").glob("*.safetensors")
            )
            row[tool] = {
                "wall_s": wall,
                "rss_mib": rss,
                "rc": rc,
                "gbps": (in_bytes + out_bytes) / wall / 1e9,
            }
            print(
                f"  {name:7s} {tool:9s} {wall:7.1f} s  peak RSS {rss:7.0f} MiB  {(in_bytes + out_bytes) / wall / 1e9:5.2f} GB/s moved ({(in_bytes + out_bytes) / wall / rate:.1%} of memcpy)",
                flush=True,
            )
        if mergekit and row["evomerge"]["rc"] == 0 and row["mergekit"]["rc"] == 0:
            row["max_abs_diff"] = _max_abs_diff(
                work / f"{name}_evomerge", work / f"{name}_mergekit"
            )
        rows.append(row)
    return rows


def _inputs(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    if "models" in recipe:
        return recipe["models"]
    return [s for sl in recipe["slices"] for s in sl["sources"]]


def _max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with (
        safe_open(str(a / "model.safetensors"), "pt") as fa,
        safe_open(str(b / "model.safetensors"), "pt") as fb,
    ):
        for name in fa.keys():
            worst = max(
                worst,
                float((fa.get_tensor(name).float() - fb.get_tensor(name).float()).abs().max()),
            )
    return worst


def inmem_bench(dirs: list[Path], rate: float, repeat: int) -> dict[str, Any]:
    """Re-merge TIES and DARE-TIES into a resident model; compare with a plain weighted sum."""
    from evomerge.engine import Merger, open_sources
    from evomerge.recipe.schema import load_recipe

    base, ft = str(dirs[0]), [str(d) for d in dirs[1:]]
    merger = Merger(
        open_sources([base, *ft]), device="cpu", seed=0, resident=True, cache_bytes=16 << 30
    )

    def recipe(method: str, density: float, weights: tuple[float, ...]) -> Any:
        return load_recipe(
            {
                "merge_method": method,
                "base_model": base,
                "models": [{"model": base}]
                + [
                    {"model": m, "parameters": {"density": density, "weight": w}}
                    for m, w in zip(ft, weights, strict=False)
                ],
                "dtype": "bfloat16",
            }
        )

    plan0 = merger.plan(recipe("ties", 0.5, (0.5, 0.3, 0.2)))
    model = merger.build_model(plan0)
    result: dict[str, Any] = {}
    trials = [
        (0.5, (0.5, 0.3, 0.2)),
        (0.4, (0.2, 0.5, 0.3)),
        (0.7, (0.3, 0.3, 0.4)),
        (0.3, (0.6, 0.2, 0.2)),
    ]
    for method in ("ties", "dare_ties"):
        t0 = time.perf_counter()
        merger.merge_into(model, merger.plan(recipe(method, *trials[0])), digest=False)
        warm = time.perf_counter() - t0
        times = []
        for density, weights in trials[1 : 1 + repeat]:
            plan = merger.plan(recipe(method, density, weights))
            t0 = time.perf_counter()
            merger.merge_into(model, plan, digest=False)
            times.append(time.perf_counter() - t0)
        result[method] = {"first_s": warm, "remerge_s": min(times), "remerge_all_s": times}
        print(
            f"  in-memory {method:9s}: first merge {warm:6.2f} s, re-merges (new density each) {', '.join(f'{t:.2f}' for t in times)} s; best {min(times):6.2f} s",
            flush=True,
        )

    # The floor: out = sum_i w_i * x_i over the same resident float32 tensors, written in place.
    plan = merger.plan(recipe("ties", 0.5, (0.5, 0.3, 0.2)))
    targets = dict(model.state_dict(keep_vars=True))
    inputs = [
        [merger._load(ref, name, torch.float32).float() for ref, name in task.inputs]
        for task in plan.tasks
    ]  # sources are held in bf16
    weights = (0.4, 0.3, 0.2, 0.1)
    times = []
    n_in = n_out = 0
    with torch.no_grad():
        for _ in range(repeat):
            t0 = time.perf_counter()
            for task, xs in zip(plan.tasks, inputs, strict=False):
                buf = torch.mul(xs[0], weights[0])
                for x, w in zip(xs[1:], weights[1:], strict=False):
                    buf.add_(x, alpha=w)
                targets[task.out_name].data.copy_(buf)
            times.append(time.perf_counter() - t0)
    for xs in inputs:
        n_in += sum(x.numel() * x.element_size() for x in xs)
        n_out += xs[0].numel() * 2
    floor = min(times)
    result["weighted_sum_s"] = floor
    result["bytes_moved"] = n_in + n_out
    print(
        f"  in-memory plain weighted sum: {floor:6.2f} s ({(n_in + n_out) / floor / 1e9:.2f} GB/s, {(n_in + n_out) / floor / rate:.0%} of memcpy)",
        flush=True,
    )
    # A harder floor: the engine's own chunked linear merge of the same four resident tensors.
    lin = load_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": m, "parameters": {"weight": w}}
                for m, w in zip([base, *ft], weights, strict=False)
            ],
            "dtype": "bfloat16",
        }
    )
    lin_plan = merger.plan(lin)
    merger.merge_into(model, lin_plan, digest=False)
    lin_times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        merger.merge_into(model, lin_plan, digest=False)
        lin_times.append(time.perf_counter() - t0)
    lin_floor = min(lin_times)
    result["fused_linear_s"] = lin_floor
    print(
        f"  in-memory chunked linear merge (engine): {lin_floor:6.2f} s ({(n_in + n_out) / lin_floor / 1e9:.2f} GB/s, {(n_in + n_out) / lin_floor / rate:.0%} of memcpy)",
        flush=True,
    )
    for method in ("ties", "dare_ties"):
        r = result[method]
        r["ratio_vs_sum"] = r["remerge_s"] / floor
        r["ratio_vs_fused_linear"] = r["remerge_s"] / lin_floor
        r["gbps"] = (n_in + n_out) / r["remerge_s"] / 1e9
        print(
            f"  in-memory {method:9s} re-merge / plain weighted sum = {r['ratio_vs_sum']:.2f}x (target <= 3x); / chunked linear = {r['ratio_vs_fused_linear']:.2f}x; {r['gbps']:.2f} GB/s moved ({r['gbps'] * 1e9 / rate:.0%} of memcpy)",
            flush=True,
        )
    del merger, model, inputs
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache",
        default=str(REPO / "results" / "bench_models"),
        help="where the bench models are built (reused)",
    )
    ap.add_argument(
        "--work", default=str(REPO / "results" / "bench_runs"), help="where merge outputs go"
    )
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument(
        "--only", nargs="*", default=["ties", "slerp", "linear"], help="disk recipes to run"
    )
    ap.add_argument(
        "--mergekit",
        default=os.environ.get("EVOMERGE_MERGEKIT") or shutil.which("mergekit-yaml"),
        help="mergekit-yaml binary (default: $EVOMERGE_MERGEKIT or PATH)",
    )
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-disk", action="store_true")
    ap.add_argument("--skip-inmem", action="store_true")
    ap.add_argument(
        "--repeat", type=int, default=3, help="re-merges timed in memory (best is reported)"
    )
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs",
        flush=True,
    )
    t0 = time.perf_counter()
    dirs = build_models(
        Path(args.cache),
        hidden=args.hidden,
        inter=args.intermediate,
        layers=args.layers,
        vocab=args.vocab,
    )
    n_params = sum(
        (lambda s: s[0] * (s[1] if len(s) > 1 else 1))(shape)
        for shape in _llama_tensors(
            args.hidden, args.intermediate, args.layers, args.vocab
        ).values()
    )
    print(
        f"models: {dirs[0].parent} ({n_params / 1e6:.0f}M parameters each, bf16; ready in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    rate = memcpy_rate()
    print(f"memcpy rate (Tensor.copy_, 512 MiB, read + write): {rate / 1e9:.2f} GB/s", flush=True)
    figures: dict[str, Any] = {"params": n_params, "memcpy_gbps": rate / 1e9}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mergekit = None if args.skip_mergekit else args.mergekit
    if not args.skip_disk:
        print("disk merges (fresh process each):", flush=True)
        rows = disk_bench(dirs, work, args.only, mergekit, rate)
        figures["disk"] = rows
        if mergekit:
            print("ratios evomerge / mergekit:")
            for row in rows:
                if row["evomerge"]["rc"] or row["mergekit"]["rc"]:
                    continue
                target = 0.25 if row["recipe"] == "ties" else 0.5
                wr = row["evomerge"]["wall_s"] / row["mergekit"]["wall_s"]
                rr = row["evomerge"]["rss_mib"] / row["mergekit"]["rss_mib"]
                row["wall_ratio"], row["rss_ratio"] = wr, rr
                print(
                    f"  {row['recipe']:7s} time {wr:5.2f}x (target <= {target}x) {'OK' if wr <= target else 'MISSED'}; peak RSS {rr:5.2f}x (target <= 1x) {'OK' if rr <= 1 else 'MISSED'}; max |diff| {row.get('max_abs_diff', float('nan')):.3g}"
                )
    if not args.skip_inmem:
        print("in-memory re-merge (resident model, float32 sources):", flush=True)
        figures["inmem"] = inmem_bench(dirs, rate, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

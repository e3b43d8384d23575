"""Generation rows of ``bench/bench_eval.py --gen`` (issue 23): evomerge's shared-prefix generation
against lm-eval's ``HFLM.generate_until``, per trial, on the same items.

Cases:
- ``gsm8k_shaped``: a GSM8K-shaped local task (``tests/_gsm8k.py``: five worked examples taken by
  ``first_n``, about 850 tokens of prompt shared by every item, GSM8K's filters and stop sequences,
  its default budget of 256 tokens), a byte-level BPE tokenizer of 32,000 tokens trained here and
  a random Llama over it whose end-of-text row is scaled so that answers end at varied lengths.
- ``gsm8k_shaped_random_shots``: the same with lm-eval's default sampler, which draws other shots
  for every item (as lm-eval's own ``gsm8k`` does): nothing is shared but ``Question:``.
- ``demo``: the demo zoo's three generation tasks (300 items, zero-shot) on the uniform merge.

Per case: seconds per trial (one ``lm_eval.evaluator.evaluate`` over the items, the call the
evaluator makes), each side timed ``--trials`` times, interleaved, medians and the median of the
per-pair ratios; the generated strings compared item by item and the scores; the tokens each side
runs and the floor: one prefix pass, each item's own tokens and the generated tokens, timed as raw
forward passes at the batch size.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# name: (hidden, layers, heads, kv heads, intermediate, end-of-text scale); vocabulary: the
# tokenizer's 32,000. The scale of the end-of-text row sets how long a random model's answers run:
# chosen so that they average about a hundred tokens, as GSM8K's worked answers do (measured:
# 10M about 150, 40M about 95; 1B not measured).
GEN_SIZES = {
    "10M": (128, 4, 4, 2, 384, 3.0),
    "40M": (384, 6, 6, 2, 1024, 2.0),
    "1B": (2048, 16, 32, 8, 8192, 2.0),
}


def _trial(lm, task_dict) -> tuple[float, dict[str, list[str]], dict[str, float]]:
    from lm_eval.evaluator import evaluate

    from evomerge.compat import quiet_task_progress
    from evomerge.evaluation.hflm import reseed_fewshot
    from evomerge.evaluation.tasks import leaf_tasks

    reseed_fewshot(leaf_tasks(task_dict).values())  # as the evaluator does: the same prompts
    with quiet_task_progress():
        t0 = time.perf_counter()
        out = evaluate(lm, task_dict, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        if str(getattr(lm, "device", "cpu")).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    gens = {  # one string per item (lm-eval logs an item once per filter)
        n: list(
            {s["doc_id"]: s["resps"][0][0] for s in sorted(v, key=lambda s: s["doc_id"])}.values()
        )
        for n, v in out["samples"].items()
    }
    scores = {
        f"{n} {k.split(',')[1]}": float(v)
        for n, r in out["results"].items()
        for k, v in r.items()
        if k.startswith("exact_match,")
    }
    return seconds, gens, scores


def _floor(model, stats, device: str) -> float:
    """Seconds of raw forwards over the ideal tokens: the prefix once, the items' own tokens in
    batches, the generated tokens as decode steps of ``stats["rows"]`` rows, on the cache the
    shared path uses (the prefix held once, :mod:`~evomerge.evaluation.prefixkv`, where the model
    allows it; else the prefix copied into each row, appending in place)."""
    from contextlib import nullcontext

    from evomerge.compat import sdpa_grouped_heads
    from evomerge.evaluation.kv import cache_rows, forward_names, growing, output_cache
    from evomerge.evaluation.prefixkv import (
        PREFIX_KWARG,
        prefix_attention,
        prefix_attention_reason,
        prefix_cache,
    )

    name, _ = forward_names(model)
    n_items = max(1, stats["items"])
    p, own, gen = stats["prefix"], stats["own"], stats["generated"]
    width = max(1, round(own / n_items))

    def timed(fn) -> tuple[float, Any]:
        """The fastest of three calls (after a warm-up): the floor, not the machine's noise."""
        out, best = fn(), float("inf")
        for _ in range(3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best, out

    vocab = model.config.vocab_size
    with torch.no_grad(), sdpa_grouped_heads(torch.device(device)):  # as the shared path runs them
        ids = torch.randint(0, vocab, (1, max(1, p)), device=device)
        t_prefix, res = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
        cache = output_cache(res)
        once = p > 0 and not prefix_attention_reason(model, cache)
        rows = max(1, min(stats["rows"], n_items))
        own_ids = torch.randint(0, vocab, (rows, width), device=device)

        def own_pass():
            if once:
                c = prefix_cache(cache, rows, width + stats["budget"])
                return model(
                    input_ids=own_ids,
                    use_cache=True,
                    logits_to_keep=1,
                    **{name: c, PREFIX_KWARG: c},
                )
            c = cache_rows(cache, torch.zeros(rows, dtype=torch.long, device=device))
            return model(input_ids=own_ids, use_cache=True, logits_to_keep=1, **{name: c})

        one = torch.randint(0, vocab, (rows, 1), device=device)
        with prefix_attention(model) if once else nullcontext():
            t_own, res = timed(own_pass)
            step_cache = output_cache(res) if once else growing(output_cache(res))
            extra = {PREFIX_KWARG: step_cache} if once else {}

            def step():
                out = model(input_ids=one, use_cache=True, **{name: step_cache}, **extra)
                step_cache.crop(-1)  # back to the same length for the timed call
                return out

            t_step, _ = timed(step)
    return t_prefix + t_own * n_items / rows + t_step * gen / rows


def _case(name: str, model, tok, task_dict, args) -> dict[str, Any]:
    import evomerge.evaluation.genlm as genlm
    from evomerge.evaluation.generate import GenStats
    from evomerge.evaluation.hflm import make_lm

    stats = GenStats()
    real = genlm.generate_shared
    shared = make_lm(model, tok, scorer="shared", batch_size=args.batch_size, device=args.device)
    hflm = make_lm(model, tok, scorer="hflm", batch_size=args.batch_size, device=args.device)
    runs: dict[str, list[tuple[float, Any, Any]]] = {"shared": [], "hflm": []}
    for i in range(args.trials):
        for side in ("hflm", "shared") if i % 2 else ("shared", "hflm"):
            if side == "shared":
                run = GenStats()
                genlm.generate_shared = lambda *a, _r=run, **k: real(*a, **{**k, "stats": _r})
                try:
                    runs[side].append(_trial(shared, task_dict))
                finally:
                    genlm.generate_shared = real
                stats = run
            else:
                runs[side].append(_trial(hflm, task_dict))
    (_, g_s, sc_s), (_, g_h, sc_h) = runs["shared"][0], runs["hflm"][0]
    pairs = [(a, b) for n in g_h for a, b in zip(g_s[n], g_h[n], strict=True)]
    equal = sum(a == b for a, b in pairs)
    ctx_tokens = _context_tokens(hflm, task_dict)
    gen_tokens = stats.generated
    ideal = {
        "prefix": sum(stats.groups),
        "own": stats.item_tokens,
        "generated": gen_tokens,
        "items": len(ctx_tokens),
        "rows": stats.rows,
        "budget": _budget(task_dict),
    }
    floor = _floor(model, ideal, args.device)
    sec_s = statistics.median(r[0] for r in runs["shared"])
    sec_h = statistics.median(r[0] for r in runs["hflm"])
    ratios = [h[0] / s[0] for s, h in zip(runs["shared"], runs["hflm"], strict=True)]
    return {
        "case": name,
        "items": len(ctx_tokens),
        "hflm_s": sec_h,
        "shared_s": sec_s,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "floor_s": floor,
        "hflm_tokens": sum(ctx_tokens) + gen_tokens,
        "shared_tokens": ideal["prefix"] + ideal["own"] + gen_tokens,
        "prefix_tokens": ideal["prefix"],
        "groups": list(stats.groups),
        "ctx_tokens": (min(ctx_tokens), max(ctx_tokens)) if ctx_tokens else (0, 0),
        "generated": gen_tokens,
        "rows": stats.rows,
        "kv_peak": stats.kv_peak,
        "equal": equal,
        "compared": len(pairs),
        "scores_equal": sc_s == sc_h,
        "scores": sc_s,
    }


def _budget(task_dict) -> int:
    """The largest ``max_gen_toks`` of the tasks (HFLM's default where a task sets none)."""
    from evomerge.evaluation.genlm import DEFAULT_MAX_GEN_TOKS
    from evomerge.evaluation.tasks import leaf_tasks

    return max(
        int((t.config.generation_kwargs or {}).get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        for t in leaf_tasks(task_dict).values()
    )


def _context_tokens(lm, task_dict) -> list[int]:
    """Prompt tokens of every item (what HFLM runs before generating), after its truncation."""
    from evomerge.evaluation.tasks import leaf_tasks

    out = []
    for task in leaf_tasks(task_dict).values():
        task.set_fewshot_seed(seed=1234)
        n = task.config.num_fewshot or 0
        for doc in task.eval_docs:
            out.append(min(len(lm.tok_encode(task.fewshot_context(doc, n))), lm.max_length))
    return out


def _gsm8k_case(args, folder: Path, sampler: str) -> tuple[Any, Any, Any]:
    import _gsm8k as G

    from evomerge.evaluation.tasks import get_task_dict, manager_for

    tok = _gsm8k_case.tok if hasattr(_gsm8k_case, "tok") else G.build_tokenizer(folder / "tok")
    _gsm8k_case.tok = tok  # type: ignore[attr-defined]
    h, n_layers, heads, kv, inter, eos_scale = GEN_SIZES[args.gen_params]
    model = G.build_model(
        tok,
        hidden=h,
        layers=n_layers,
        heads=heads,
        kv_heads=kv,
        intermediate=inter,
        eos_scale=eos_scale,
        dtype=getattr(torch, args.dtype),
    ).to(args.device)
    task = folder / sampler
    G.write_task(task, items=args.gen_items, sampler=sampler)
    return model, tok, get_task_dict([G.TASK], manager_for([G.TASK], str(task)))


def _demo_case(args) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.tasks import get_task_dict, manager_for
    from evomerge.zoo import ensure_zoo, gen_task_names

    zoo = ensure_zoo("demo")
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    models = {
        n: AutoModelForCausalLM.from_pretrained(zoo / n) for n in ("base", "rot", "sort", "shift")
    }
    base = models["base"].state_dict()
    merged = {
        k: base[k]
        + sum((models[e].state_dict()[k] - base[k]) / 3 for e in ("rot", "sort", "shift"))
        for k in base
    }
    model = models["base"]
    model.load_state_dict(merged)
    names = gen_task_names()[0]
    return (
        model.eval().to(args.device),
        tok,
        get_task_dict(names, manager_for(names, str(zoo / "tasks"))),
    )


def demo_shots(args) -> None:
    """Each expert of the demo zoo on its own generation task with 0, 1 and 3 few-shot examples:
    through lm-eval (the zoo's 32-token context keeps the last 24 tokens of a prompt) and with the
    whole prompt given to ``generate`` (no truncation), 100 items each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.hflm import make_lm
    from evomerge.evaluation.tasks import get_task_dict, leaf_tasks, manager_for
    from evomerge.zoo import SKILLS, ensure_zoo

    zoo = ensure_zoo("demo")
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    print("\n== demo zoo experts on their own generation task, exact match by number of shots")
    for skill in SKILLS:
        name = f"zoo_{skill}_gen"
        model = AutoModelForCausalLM.from_pretrained(zoo / skill).eval()
        td = get_task_dict([name], manager_for([name], str(zoo / "tasks")))
        task = leaf_tasks(td)[name]
        cells = []
        for shots in (0, 1, 3):
            task.set_config(key="num_fewshot", value=shots)
            _, gens, scores = _trial(make_lm(model, tok, batch_size=32), td)
            whole = 0
            for doc in task.eval_docs:
                ids = tok(task.fewshot_context(doc, shots), return_tensors="pt").input_ids
                out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
                text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                whole += text.split("\n")[0].strip() == task.doc_to_target(doc)
            cells.append(
                f"{shots} shots: lm-eval {scores[f'{name} extract']:.2f}, whole prompt {whole / len(task.eval_docs):.2f}"
            )
        print(f"  {skill:5}  " + "; ".join(cells))


def main_gen(args) -> int:
    """Run the generation cases and print their rows; exit status 1 if any generation differs."""
    from evomerge.evaluation.tasks import quiet_lm_eval

    quiet_lm_eval()
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.gen_cases:
            if case == "demo_shots":
                demo_shots(args)
                continue
            if case == "demo":
                model, tok, td = _demo_case(args)
            else:
                sampler = "default" if case == "gsm8k_shaped_random_shots" else "first_n"
                model, tok, td = _gsm8k_case(args, Path(tmp), sampler)
            row = _case(case, model, tok, td, args)
            rows.append(row)
            n_params = sum(p.numel() for p in model.parameters())
            gen = row["generated"] / max(1, row["items"])
            print(
                f"\n== {case}: {row['items']} items, answers {gen:.0f} tokens on average, prompts {row['ctx_tokens'][0]}-{row['ctx_tokens'][1]} tokens "
                f"(shared prefix {'/'.join(map(str, row['groups']))} tokens), model {n_params / 1e6:.1f}M params, vocab {model.config.vocab_size}, "
                f"{args.dtype}, batch size {args.batch_size}, on {device}"
            )
            print(
                f"  hflm   {row['hflm_s']:7.2f} s per trial   (runs {row['hflm_tokens']} tokens: every prompt whole, then the generated ones)"
            )
            print(
                f"  shared {row['shared_s']:7.2f} s per trial   (runs {row['shared_tokens']} tokens: the prefix once, each item's own, the generated ones)"
            )
            print(
                f"  floor  {row['floor_s']:7.2f} s             (raw forwards over the shared path's tokens: one prefix pass, own tokens, {row['generated']} generated in steps of {row['rows']} rows)"
            )
            cfg = model.config.get_text_config()
            column = (
                2
                * cfg.num_hidden_layers
                * cfg.num_key_value_heads
                * (cfg.hidden_size // cfg.num_attention_heads)
            )
            hflm_kv = args.batch_size * (row["ctx_tokens"][1] + _budget(td)) * column
            print(
                f"  memory: shared decoded up to {row['rows']} rows together and held at most {row['kv_peak'] / column:.0f} key/value columns "
                + (
                    "(the prefix once, each row's own)"
                    if row["rows"] > args.batch_size
                    else "(the prefix copied into each row)"
                )
                + f"; HFLM's cache holds up to {hflm_kv / column:.0f} at batch size {args.batch_size} "
                f"({args.batch_size} rows x (longest prompt + budget))"
            )
            print(
                f"  speed: shared is {row['ratio']:.2f}x HFLM (median of {args.trials} interleaved pairs: "
                + ", ".join(f"{r:.2f}" for r in row["ratios"])
                + f"); HFLM / floor {row['hflm_s'] / row['floor_s']:.1f}x, shared / floor {row['shared_s'] / row['floor_s']:.1f}x"
            )
            print(
                f"  agreement: {row['equal']} of {row['compared']} generated strings equal; scores "
                + ("equal" if row["scores_equal"] else "DIFFERENT")
                + ": "
                + ", ".join(f"{k} {v:.3f}" for k, v in row["scores"].items())
            )
    if not args.device.startswith("cuda"):
        print("\n== GPU: not measured on GPU (run with --device cuda)")
    if args.json:
        import json

        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1, default=str))
    return 0 if all(r["equal"] == r["compared"] and r["scores_equal"] for r in rows) else 1

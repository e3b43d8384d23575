"""Evaluation benchmark: the shared-context scorer against lm-eval's HFLM, per trial (issue 12).

A random-weight Llama scores a local few-shot 4-choice task with long contexts (ARC-shaped:
``Question: ... Answer:`` shots, multi-token choices of different lengths) through lm-eval, once
with each scorer. Printed per scorer: seconds per trial (one ``lm_eval.evaluator.evaluate`` over the
items, the call :class:`~evomerge.evaluation.LMEvalEvaluator` makes), tokens per second, and the
agreement of the two: max |delta loglikelihood| over all requests, ``is_greedy`` and accuracy equal.

Usage:
    python bench/bench_eval.py                                  # CPU: ~20M params, 50 items, ~500-token contexts
    python bench/bench_eval.py --gen --threads 1                # generation rows (bench/bench_eval_gen.py)
    python bench/bench_eval.py --device cuda --params 1B --items 100 --ctx-tokens 1500 --dtype bfloat16 --batch-size 32

Tokens are characters (the zoo's character tokenizer); the model's vocabulary is larger than the
tokenizer's, so the output layer costs what a real model's does. "HFLM tokens" counts what HFLM
runs: every (context, choice) pair in full.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (hidden, layers, heads, kv heads, intermediate, vocab)
SIZES = {
    "20M": (384, 6, 6, 2, 1024, 16000),
    "100M": (768, 10, 12, 4, 2048, 32000),
    "1B": (2048, 16, 32, 8, 8192, 32000),
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASK = "bench_long_mc"


def build_model(size: str, dtype: torch.dtype, device: str, max_len: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    h, n_layers, heads, kv, inter, vocab = SIZES[size]
    cfg = LlamaConfig(
        hidden_size=h,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def _doc(rng: random.Random, story_chars: int) -> dict:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < story_chars or len(words) < 5:
        words.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9))))
    i = rng.randrange(len(words) - 1)
    gold = words[i + 1]
    others = [w for w in dict.fromkeys(words) if w != gold]
    wrong = rng.sample(others, 3)
    label = rng.randrange(4)
    choices = wrong[:label] + [gold] + wrong[label:]
    return {
        "question": f"{' '.join(words)}\nWhich word follows '{words[i]}'?",
        "choices": choices,
        "label": label,
    }


def write_task(folder: Path, *, items: int, shots: int, ctx_tokens: int, seed: int = 0) -> None:
    """A local lm-eval task: ``items`` test docs, a train split for the shots; the prompt of one
    doc with its shots is about ``ctx_tokens`` characters long."""
    rng = random.Random(seed)
    story = max(
        20, ctx_tokens // (shots + 1) - 55
    )  # ~55 characters of question, answer and delimiters
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", max(4 * shots, 20)), ("test", items)):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps(_doc(rng, story)) + "\n" for _ in range(n))
        )
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n"
        f"    test: {folder / 'test.jsonl'}\ntraining_split: train\ntest_split: test\nfewshot_split: train\n"
        f"num_fewshot: {shots}\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def trial(
    lm, task_dict, items: int
) -> tuple[float, float, list[tuple[str, str]], list[tuple[float, bool]]]:
    """One scoring pass as LMEvalEvaluator runs it (plus the per-request answers)."""
    from lm_eval.evaluator import evaluate

    from evomerge.compat import quiet_task_progress

    # lm-eval's evaluate() draws the shots from the task's generator where the last call left it;
    # reseed so that both scorers see the same prompts.
    task_dict[TASK].set_fewshot_seed(seed=1234)
    with quiet_task_progress():
        t0 = time.perf_counter()
        out = evaluate(
            lm,
            task_dict,
            samples={TASK: list(range(items))},
            bootstrap_iters=100,
            log_samples=True,
            verbosity="ERROR",
        )
        seconds = time.perf_counter() - t0
    args, answers = [], []
    for s in sorted(out["samples"][TASK], key=lambda s: s["doc_id"]):
        args += [tuple(a) for a in s["arguments"]]
        answers += [tuple(r[0]) for r in s["resps"]]
    return seconds, float(out["results"][TASK]["acc,none"]), args, answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="20M", choices=list(SIZES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument(
        "--ctx-tokens",
        type=int,
        default=500,
        help="approximate context length of one item, shots included",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--trials", type=int, default=1, help="timed trials per scorer (the best is reported)"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--gen",
        action="store_true",
        help="the generation rows instead (bench/bench_eval_gen.py): shared-prefix generation against HFLM.generate_until",
    )
    ap.add_argument(
        "--gen-cases",
        nargs="+",
        default=["gsm8k_shaped", "gsm8k_shaped_random_shots", "demo"],
        choices=["gsm8k_shaped", "gsm8k_shaped_random_shots", "demo", "demo_shots"],
    )
    ap.add_argument("--gen-items", type=int, default=40, help="items of the GSM8K-shaped task")
    ap.add_argument(
        "--gen-params", default="10M", help="model size of the GSM8K-shaped cases (10M, 40M, 1B)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gen:
        from bench_eval_gen import main_gen

        if args.trials < 3:
            args.trials = 3  # interleaved pairs: the ratio is their median
        return main_gen(args)

    from evomerge.evaluation.hflm import make_lm
    from evomerge.evaluation.tasks import get_task_dict, manager_for, quiet_lm_eval
    from evomerge.zoo.data import make_tokenizer

    quiet_lm_eval()
    dtype = getattr(torch, args.dtype)
    model = build_model(args.params, dtype, args.device, max_len=max(2048, 2 * args.ctx_tokens))
    n_params = sum(p.numel() for p in model.parameters())
    tok = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), items=args.items, shots=args.shots, ctx_tokens=args.ctx_tokens)
        task_dict = get_task_dict([TASK], manager_for([TASK], tmp))
        got = {}
        for scorer in ("shared", "hflm"):
            lm = make_lm(model, tok, scorer=scorer, batch_size=args.batch_size, device=args.device)
            runs = [trial(lm, task_dict, args.items) for _ in range(args.trials)]
            got[scorer] = min(runs, key=lambda r: r[0])
    sec_s, acc_s, pairs, ans_s = got["shared"]
    sec_h, acc_h, pairs_h, ans_h = got["hflm"]
    if pairs != pairs_h:
        raise SystemExit("the two runs scored different requests")
    lens = [
        (len(tok(c).input_ids), len(tok(c + x).input_ids) - len(tok(c).input_ids)) for c, x in pairs
    ]
    hflm_tokens = sum(c + x for c, x in lens)
    shared_tokens = sum(
        c for c, _ in dict(zip((p[0] for p in pairs), lens, strict=True)).values()
    ) + sum(x for _, x in lens)
    dmax = max(abs(a[0] - b[0]) for a, b in zip(ans_s, ans_h, strict=True))
    greedy_equal = all(a[1] == b[1] for a, b in zip(ans_s, ans_h, strict=True))

    with torch.no_grad():  # the floor: raw forward passes over HFLM's token count
        x = torch.randint(0, 40, (args.batch_size, max(c + n for c, n in lens)), device=args.device)
        model(x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        raw = x.numel() / (time.perf_counter() - t0)

    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"model: random Llama, {n_params / 1e6:.1f}M params ({args.params}), {args.dtype}, on {device}"
    )
    print(
        f"task: {args.items} items x 4 choices, {args.shots}-shot, contexts {min(c for c, _ in lens)}-{max(c for c, _ in lens)} tokens "
        f"(mean {sum(c for c, _ in lens) / len(lens):.0f}), continuations {min(x for _, x in lens)}-{max(x for _, x in lens)} tokens; batch size {args.batch_size}"
    )
    print(
        f"tokens: HFLM runs {hflm_tokens}, the shared scorer {shared_tokens} ({hflm_tokens / shared_tokens:.2f}x fewer)"
    )
    print(f"raw forward: {raw:,.0f} tokens/s -> HFLM's tokens would take {hflm_tokens / raw:.2f} s")
    for name, sec, ran in (("hflm", sec_h, hflm_tokens), ("shared", sec_s, shared_tokens)):
        print(
            f"{name:>7}: {sec:7.2f} s per trial, {hflm_tokens / sec:,.0f} scored tokens/s ({ran / sec:,.0f} tokens/s run)"
        )
    print(f"speed: shared is {sec_h / sec_s:.2f}x faster than HFLM")
    print(
        f"agreement: max |delta loglik| {dmax:.2e} over {len(ans_s)} requests; is_greedy equal: {greedy_equal}; "
        f"accuracy {acc_s:.3f} vs {acc_h:.3f} ({'equal' if acc_s == acc_h else 'DIFFERENT'})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "params": n_params,
                    "device": device,
                    "dtype": args.dtype,
                    "items": args.items,
                    "hflm_s": sec_h,
                    "shared_s": sec_s,
                    "speedup": sec_h / sec_s,
                    "hflm_tokens": hflm_tokens,
                    "shared_tokens": shared_tokens,
                    "raw_tokens_per_s": raw,
                    "max_abs_dloglik": dmax,
                    "greedy_equal": greedy_equal,
                    "acc_shared": acc_s,
                    "acc_hflm": acc_h,
                },
                indent=1,
            )
        )
    return 0 if acc_s == acc_h and greedy_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())

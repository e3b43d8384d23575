"""Training and scoring of the zoo's tiny Llama models (plain torch loops, deterministic)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.zoo.data import Item

__all__ = ["ZooSize", "SIZES", "new_model", "train", "score_items"]


@dataclass(frozen=True)
class ZooSize:
    """Model shape and training budget of one zoo size."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    batch: int
    n_search: int
    n_holdout: int
    replay: float = 0.3
    expert_batch: int = 0  # 0: same as batch
    threads: int = 1
    # Pretrain the base with the loss on answers only: prompt letters are uniformly random, so their
    # loss is pure noise, and the answer loss alone teaches every answer family in the same steps.
    base_answer_only: bool = False
    # Per-skill learning rates (skills not listed use expert_lr). Unequal rates give experts of
    # unequal delta size, as fine-tunes from different hands are: uniform merge weights are then
    # miscalibrated and per-model weights have something to correct.
    skill_lr: Mapping[str, float] = field(default_factory=dict)
    # Merges measured at build time: one task-arithmetic weight for every expert, a tuple with one
    # per expert, or a dict for another method with uniform parameters.
    merge_grid: tuple[float | tuple[float, ...] | dict[str, Any], ...] = (
        1 / 3,
        {"method": "ties", "weight": 1.0, "density": 0.5},
    )

    def lr_for(self, skill: str) -> float:
        """The fine-tuning learning rate of ``skill``'s expert."""
        return float(self.skill_lr.get(skill, self.expert_lr))


SIZES: dict[str, ZooSize] = {
    "demo": ZooSize(
        hidden=128,
        layers=4,
        heads=4,
        intermediate=384,
        base_steps=1600,
        base_lr=2e-3,
        base_answer_only=True,
        expert_steps=200,
        expert_lr=1e-3,
        skill_lr={"rot": 3e-4, "sort": 1e-3, "shift": 2e-3},
        batch=32,
        expert_batch=64,
        n_search=100,
        n_holdout=100,
        merge_grid=(
            1 / 3,
            0.5,
            1.0,
            {"method": "ties", "weight": 1.0, "density": 0.5},
            (
                0.78,
                0.75,
                0.34,
            ),  # the best of 60 TPE trials (bench/bench_zoo.py --weights 60) on the seed-0 demo zoo
        ),
    ),
    # Tests only need clear specialization, so the experts train harder than the demo's.
    "micro": ZooSize(
        hidden=64,
        layers=2,
        heads=4,
        intermediate=192,
        base_steps=400,
        base_lr=3e-3,
        expert_steps=250,
        expert_lr=1e-3,
        batch=32,
        n_search=48,
        n_holdout=48,
    ),
}


def new_model(size: ZooSize, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` of the given size (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=32,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _batch(
    tokenizer, lines: Sequence[str], answer_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(lines), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    if answer_only:
        # Loss on the answer only: everything up to and including "=" is context.
        eq = tokenizer.convert_tokens_to_ids("=")
        upto = (ids == eq).int().cumsum(1) == 0
        labels = labels.masked_fill(upto | (ids == eq), -100)
    return ids, mask, labels


def train(
    model,
    tokenizer,
    make_line: Callable[[random.Random], str],
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    answer_only: bool,
    warmup: int = 50,
    progress: str | None = None,
) -> float:
    """Train ``model`` in place with AdamW and a warmup + cosine schedule; returns the last loss.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (right padding).
        make_line: draws one training line from an ``random.Random``.
        steps: optimizer steps.
        lr: peak learning rate.
        batch: lines per step.
        seed: data and dropout seed.
        answer_only: compute the loss on the answer tokens only.
        progress: tqdm description (None: no bar).
    """
    from tqdm.auto import tqdm

    rng = random.Random(f"train/{seed}")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    loss_v = float("nan")
    bar = tqdm(range(steps), desc=progress, leave=False, disable=progress is None, mininterval=0.5)
    for _ in bar:
        ids, mask, labels = _batch(tokenizer, [make_line(rng) for _ in range(batch)], answer_only)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(out.loss.detach())
        bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
    model.eval()
    return loss_v


@torch.no_grad()
def score_items(model, tokenizer, items: Sequence[Item]) -> float:
    """Multiple-choice accuracy (sum of answer log-likelihoods, as lm-eval's ``acc``) of ``items``.

    Used for the build's own quick checks; the figures in the manifest come from lm-eval.
    """
    lines, spans = [], []
    for it in items:
        for c in it.choices:
            lines.append(f"{it.prompt} {c}")
            spans.append(len(it.prompt))
    enc = tokenizer(lines, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    pos = torch.arange(ids.shape[1] - 1)[None]
    start = torch.tensor(spans)[
        :, None
    ]  # continuation (" " + choice) starts at token index len(prompt)
    keep = (pos >= start - 1) & (mask[:, 1:] == 1)
    total = (tok_lp * keep).sum(1).view(len(items), -1)
    pred = total.argmax(1)
    gold = torch.tensor([it.label for it in items])
    return float((pred == gold).float().mean())

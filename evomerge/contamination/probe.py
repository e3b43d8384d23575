"""Opt-in memorization probe (``--probe-contamination``): Min-K%++ of the merge vs its base.

Method. Min-K%++ (Zhang et al., arXiv 2404.02936) scores how much a text looks like
training data of a causal LM. At each position ``t`` the model predicts a distribution
``p(.|x<t)`` over the vocabulary; the token score is
``(log p(x_t|x<t) - mu_t) / sigma_t`` with ``mu_t = E_{z~p}[log p(z|x<t)]`` and
``sigma_t**2 = Var_{z~p}[log p(z|x<t)]`` (expectations under the model's own next-token
distribution). A text's score is the mean of its lowest ``k`` share of token scores
(``k = 0.2``; at least one token). Texts the model was trained on sit at local maxima of
its likelihood, so their scores are higher.

Scores of different models are not comparable in absolute terms, so the probe compares
*gains*: for every evaluation item, ``gain = score(merged) - score(base)``. A merge
whose parents were trained on the items gains more on them than on comparable text the
parents cannot have seen. Two kinds of comparison text:

* ``controls=`` (preferred): unseen texts from the same distribution (freshly generated
  or freshly written items, a disjoint holdout item set of the same tasks, or another
  split: ``task_texts(..., split="validation")``). Unpaired: ``delta = mean(gain on items) - mean(gain on
  controls)``, ``se = sqrt(var_items/n + var_controls/m)``.
* default: a perturbed neighbour of every item (:func:`perturb_texts`: a seeded share
  of its words replaced by the words other items have at the same position). Paired by item:
  ``d_i = gain(item_i) - gain(neighbour_i)``, ``delta = mean(d)``, ``se = sd(d)/sqrt(n)``.
  Memorized items are sharp peaks, so a memorizing merge loses more than its base when an
  item is perturbed.

Flag rule: ``memorization_probe`` is raised when ``n >= min_items`` (10), ``delta >
min_delta`` (0.1 Min-K%++ units) and ``delta / se > z`` (3.0, one-sided normal tail
~0.0013). Everything random (neighbours) is fixed by ``seed``.

Limits. It is a statistical signal, not a proof: (1) it needs the base model and a shared
tokenizer, and one forward pass of both models over items and controls; (2) items must be
long enough to have several tokens, and short formulaic items (arithmetic) give weak,
noisy scores; (3) with perturbed neighbours, a parent that learned a skill whose answers
depend on the perturbed words can also look "peaked", so the default can over-flag on
formula-like tasks; fresh same-distribution controls avoid this; (4) if the base model
itself saw the items, the merge gains nothing over it and the probe cannot see that;
(5) membership inference on LLMs is weak in general (Min-K%++ reports AUROC well below 1
on pre-training data); here the setting is easier (fine-tuning on the very items, compared
with the pre-fine-tuning base), but a "not raised" is never a clean bill of health.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from evomerge.evaluation.tasks import (
    DOC_SPLITS,
    item_text,
    load_leaf_tasks,
    manager_for,
    task_docs,
)

__all__ = ["ProbeResult", "min_k_plus_plus", "perturb_texts", "probe_contamination", "task_texts"]


@torch.inference_mode()
def min_k_plus_plus(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: float = 0.2,
    batch_size: int = 4,
    max_length: int = 512,
) -> torch.Tensor:
    """Min-K%++ score of every text under a causal LM (higher: more like training data).

    Args:
        model: a causal LM returning ``.logits`` (``transformers`` ``*ForCausalLM``).
        tokenizer: its tokenizer (special tokens are added as the tokenizer does by default).
        texts: the texts.
        k: share of lowest token scores averaged, in (0, 1].
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens.
    Returns:
        float32 tensor of shape ``(len(texts),)``; NaN for a text with fewer than 2 tokens.
    Raises:
        ValueError: ``k`` outside (0, 1] or ``batch_size`` < 1.
    """
    if not 0 < k <= 1 or batch_size < 1:
        raise ValueError(f"need 0 < k <= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            ids = [
                tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
                for t in texts[start : start + batch_size]
            ]
            width = max(2, max(len(i) for i in ids))
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):  # right padding: positions stay 0..len-1
                batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            batch, mask = batch.to(device), mask.to(device)
            logits = model(input_ids=batch, attention_mask=mask).logits
            # Scored where the logits are: copying batch x length x vocab to the CPU would
            # cost more than the math.
            out.append(_min_k_pp_from_logits(logits.float(), batch, mask, k).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _min_k_pp_from_logits(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, k: float
) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    probs = logp.exp()
    mu = (probs * logp).sum(-1)
    sigma = (probs * (logp - mu.unsqueeze(-1)).square()).sum(-1).clamp_min(1e-12).sqrt()
    token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    score = (token - mu) / sigma
    valid = mask[:, 1:].bool()
    ordered = torch.where(valid, score, torch.inf).sort(dim=-1).values
    n = valid.sum(-1)
    keep = (n.float() * k).floor().clamp_min(1).long()
    take = torch.arange(ordered.shape[1], device=ordered.device).unsqueeze(0) < keep.unsqueeze(1)
    mean = torch.where(take, ordered, 0.0).sum(-1) / keep
    return torch.where(n > 0, mean, torch.nan)


def perturb_texts(texts: Sequence[str], *, rate: float = 0.2, seed: int = 0) -> list[str]:
    """A neighbour of every text: a share of its words replaced by words of the other texts.

    A word is replaced by a word that another item has at the same position (word index),
    and positions where every other item has the same word are kept: templated items
    (``"Question: ... Answer: ..."``) share their fixed words, so the neighbour differs from
    the item in content, not in form. Only when no position varies are words drawn from
    anywhere in the other items.

    Args:
        texts: the evaluation items.
        rate: share of words replaced (at least one word per text; fewer when fewer
            positions vary across the items).
        seed: fixes the choice of positions and replacement words.
    Returns:
        One perturbed text per input, whitespace-normalised.
    """
    rng = random.Random(seed)
    words = [t.split() for t in texts]
    out: list[str] = []
    for i, w in enumerate(words):
        if not w:
            out.append("")
            continue
        # Replacement words come from the *original* other items, never from neighbours.
        others = [ws for j, ws in enumerate(words) if j != i]
        slots = [
            sorted({ws[p] for ws in others if p < len(ws) and ws[p] != w[p]}) for p in range(len(w))
        ]
        want = max(1, round(rate * len(w)))
        varying = [p for p in range(len(w)) if slots[p]]
        new = list(w)
        if varying:
            for pos in rng.sample(varying, min(want, len(varying))):
                new[pos] = rng.choice(slots[pos])
        else:
            pool = sorted({x for ws in others for x in ws} - set(w))
            for pos in rng.sample(range(len(w)), want) if pool else []:
                new[pos] = rng.choice(pool)
        out.append(" ".join(new))
    return out


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`probe_contamination`; scores are means in Min-K%++ units."""

    flag: bool
    method: str  # "unseen controls" or "perturbed neighbours"
    n_items: int
    n_controls: int
    merged_score: float  # merged model on the items
    base_score: float  # base model on the items
    merged_control: float  # merged model on the controls
    base_control: float  # base model on the controls
    delta: float  # gain on items minus gain on controls
    se: float
    z: float
    threshold_z: float
    min_delta: float
    min_items: int = 10

    @property
    def evidence(self) -> str:
        gain_items = self.merged_score - self.base_score
        gain_ctrl = self.merged_control - self.base_control
        if self.n_items == 0 or math.isnan(self.delta):
            return f"not enough scorable items ({self.n_items})"
        verdict = ">" if self.z > self.threshold_z else "not >"
        few = min(self.n_items, self.n_controls) < self.min_items
        return (
            f"Min-K%++ gain of the merge over its base: {gain_items:+.3f} on {self.n_items} "
            f"eval items vs {gain_ctrl:+.3f} on {self.n_controls} {self.method}; "
            f"delta {self.delta:+.3f} ± {self.se:.3f} (z {self.z:.1f} {verdict} "
            f"{self.threshold_z:g}, min delta {self.min_delta:g})"
            + (f"; too few items to flag (need {self.min_items})" if few else "")
        )

    def columns(self) -> dict[str, Any]:
        """``{"memorization_probe": flag, "memorization_probe_evidence": text}``."""
        return {"memorization_probe": self.flag, "memorization_probe_evidence": self.evidence}


def probe_contamination(
    model: Any,
    base_model: Any,
    tokenizer: Any,
    eval_texts: Sequence[str],
    *,
    controls: Sequence[str] | None = None,
    k: float = 0.2,
    z: float = 3.0,
    min_delta: float = 0.1,
    min_items: int = 10,
    rate: float = 0.2,
    seed: int = 0,
    batch_size: int = 4,
    max_length: int = 512,
) -> ProbeResult:
    """Does the merged model look like it was trained on the evaluation items?

    Args:
        model: the merged model.
        base_model: the base model of the merge (same tokenizer).
        tokenizer: the shared tokenizer.
        eval_texts: the evaluation items as text (see :func:`task_texts`).
        controls: unseen same-distribution texts; ``None``: perturbed neighbours of the items.
        k: Min-K%++ share of tokens.
        z: the flag rule's z threshold (see the module docstring).
        min_delta: the flag rule's smallest mean gain difference.
        min_items: the flag rule's smallest number of items.
        rate: the share of words replaced in a neighbour (ignored with ``controls``).
        seed: the neighbours' seed (ignored with ``controls``).
        batch_size: passed to :func:`min_k_plus_plus`.
        max_length: passed to :func:`min_k_plus_plus`.
    Returns:
        :class:`ProbeResult`.
    """
    paired = controls is None
    ctrl = perturb_texts(eval_texts, rate=rate, seed=seed) if controls is None else list(controls)
    kw: dict[str, Any] = {"k": k, "batch_size": batch_size, "max_length": max_length}
    m_i, b_i = (min_k_plus_plus(x, tokenizer, eval_texts, **kw) for x in (model, base_model))
    m_c, b_c = (min_k_plus_plus(x, tokenizer, ctrl, **kw) for x in (model, base_model))
    gain_i, gain_c = (m_i - b_i).double(), (m_c - b_c).double()
    if paired:
        ok = ~(gain_i.isnan() | gain_c.isnan())
        m_i, b_i, m_c, b_c = m_i[ok], b_i[ok], m_c[ok], b_c[ok]
        d = gain_i[ok] - gain_c[ok]
        n = m = int(d.numel())
        delta = d.mean().item() if n else math.nan
        se = d.std().item() / math.sqrt(n) if n > 1 else math.nan
    else:
        ok_i, ok_c = ~gain_i.isnan(), ~gain_c.isnan()
        m_i, b_i, m_c, b_c = m_i[ok_i], b_i[ok_i], m_c[ok_c], b_c[ok_c]
        gi, gc = gain_i[ok_i], gain_c[ok_c]
        n, m = int(gi.numel()), int(gc.numel())
        delta = (gi.mean() - gc.mean()).item() if n and m else math.nan
        se = math.sqrt(gi.var().item() / n + gc.var().item() / m) if n > 1 and m > 1 else math.nan
    stat = delta / se if se and not math.isnan(se) else (math.inf if delta > 0 else math.nan)
    flag = bool(n >= min_items and m >= min_items and delta > min_delta and stat > z)
    mean = lambda t: t.mean().item() if t.numel() else math.nan  # noqa: E731
    return ProbeResult(
        flag,
        "perturbed neighbours" if paired else "unseen controls",
        n,
        m,
        mean(m_i),
        mean(b_i),
        mean(m_c),
        mean(b_c),
        delta,
        se,
        stat,
        z,
        min_delta,
        min_items,
    )


def task_texts(
    task_names: Iterable[str],
    include_path: Any = None,
    *,
    limit: int | None = None,
    split: str = "eval",
    task_manager: Any = None,
) -> list[str]:
    """Items of lm-eval tasks as plain text: prompt, target delimiter and gold answer.

    Loads the tasks' documents through lm-eval (local files, or the datasets cache; nothing
    is downloaded when ``HF_DATASETS_OFFLINE=1``). ``split="validation"`` (or ``"train"``)
    gives same-distribution texts that can serve as ``controls`` for items of the test split,
    provided the sources were not tuned on that split.

    Args:
        task_names: lm-eval task or group names.
        include_path: lm-eval include path for local tasks; when every task is found there,
            lm-eval's own task index is not built (seconds saved).
        limit: at most this many items per task.
        split: ``"eval"`` (the split lm-eval evaluates: test, else validation), ``"test"``,
            ``"validation"`` or ``"train"``.
        task_manager: an ``lm_eval.tasks.TaskManager`` to use instead of building one.
    Returns:
        The texts, task by task in the order lm-eval gives them.
    Raises:
        ValueError: an unknown ``split``, or a task that has no such split.
    """
    if split not in DOC_SPLITS:  # before lm-eval spends seconds loading the tasks
        raise ValueError(f"split must be one of {', '.join(DOC_SPLITS)}; got {split!r}")
    names = list(task_names)
    tm = task_manager if task_manager is not None else manager_for(names, include_path)
    out: list[str] = []
    for task in load_leaf_tasks(names, tm).values():
        out += [item_text(task, doc) for doc in islice(task_docs(task, split), limit)]
    return out

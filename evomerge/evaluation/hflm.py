"""The lm-eval LMs that score an in-memory model (:func:`make_lm` picks one by
``evaluate.scorer``; a search prints its own progress, so they draw no bars), :class:`MemoLM` that
answers a request it ran once from memory, and :func:`reseed_fewshot`.

This module imports ``lm_eval`` (and ``transformers``) when it is imported: the search imports it,
the readers of a study (results, export, report) do not.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM

from evomerge.compat import feed_cache_hook, hflm_loglikelihood_tokens
from evomerge.evaluation.base import SCORERS, say_once
from evomerge.evaluation.genlm import generate_until_shared, hflm_only
from evomerge.evaluation.kv import sliding_window
from evomerge.evaluation.scorer import score_shared

__all__ = [
    "SharedContextHFLM",
    "QuietHFLM",
    "QuietSharedContextHFLM",
    "MemoLM",
    "make_lm",
    "FEWSHOT_SEED",
    "reseed_fewshot",
]

# The shared-context scorer's notes (why requests go to HFLM's path) under the scorer's name.
_say = functools.partial(say_once, log=logging.getLogger("evomerge.evaluation.scorer"))

FEWSHOT_SEED = 1234  # every evaluation reseeds lm-eval's few-shot samplers with it


def reseed_fewshot(tasks: Iterable[Any]) -> None:
    """Reseed the few-shot sampler of each lm-eval task: lm-eval draws few-shot examples from a
    task's generator where the previous call left it, so every evaluation starts from here."""
    for task in tasks:
        task.set_fewshot_seed(seed=FEWSHOT_SEED)


class SharedContextHFLM(HFLM):
    """lm-eval's ``HFLM`` with :func:`~evomerge.evaluation.scorer.score_shared` under
    ``loglikelihood`` and :func:`~evomerge.evaluation.genlm.generate_until_shared` under
    ``generate_until``.

    Tokenization (``tok_encode``, the moved trailing space, the empty-context prefix token),
    ``max_length`` and ``batch_size`` are HFLM's; only the forward passes change. HFLM's own path
    still runs: ``loglikelihood_rolling``; the generations ``generate_until_shared`` leaves out
    (and those of the tasks in the instance's ``hflm_tasks``: task name -> why);
    ``batch_size="auto"``, seq2seq models and several processes; and on models with a sliding
    attention window, pairs longer than half the window. The response cache hook is fed as
    HFLM feeds it (a no-op unless lm-eval's ``use_cache`` wraps the LM, which evomerge never does).

    Example:
        >>> lm = SharedContextHFLM(pretrained=model, tokenizer=tok, batch_size=16, device="cpu")  # doctest: +SKIP
        >>> lm_eval.evaluator.evaluate(lm, task_dict)  # doctest: +SKIP
    """

    def _loglikelihood_tokens(  # compat.HFLM_TOKENS: what HFLM.loglikelihood calls
        self, requests: Any, disable_tqdm: bool = False, override_bs: int | None = None
    ) -> Any:
        # the windows of loglikelihood_rolling have no context
        why = "rolling" if any(r[0] is None for r in requests) else hflm_only(self)
        if why:
            if why != "rolling":  # loglikelihood_rolling said so already
                _say(why, f"shared-context scorer: {why}: loglikelihood requests use HFLM's path")
            return hflm_loglikelihood_tokens(
                self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs
            )
        cut = sum(len(c) + len(x) > self.max_length + 1 for _, c, x in requests)
        if cut:
            _say(
                "cut",
                f"shared-context scorer: {cut} of {len(requests)} requests exceed max_length ({self.max_length}): their contexts are left-truncated as HFLM does",
            )
        # Right-padded rows stay inside a sliding window when every pair fits half of it.
        window = sliding_window(self.model)
        mine = [
            i
            for i, (_, c, x) in enumerate(requests)
            if window is None or min(len(c) + len(x), self.max_length + 1) <= window // 2
        ]
        rest = sorted(set(range(len(requests))) - set(mine))
        res: list[Any] = [None] * len(requests)
        if rest:
            _say(
                "window",
                f"shared-context scorer: pairs longer than half the sliding window ({window}) use HFLM's path",
            )
            hflm = hflm_loglikelihood_tokens(self, [requests[i] for i in rest], disable_tqdm=True)
            for i, r in zip(rest, hflm, strict=True):
                res[i] = r
        got = score_shared(
            self.model,
            [(requests[i][1], requests[i][2]) for i in mine],
            max_length=self.max_length,
            batch_size=int(self.batch_size),
            device=self.device,
            softmax_dtype=getattr(self, "softmax_dtype", None),
            autocast_dtype=getattr(self, "mixed_precision_dtype", None),
        )
        for i, r in zip(mine, got, strict=True):
            res[i] = r
            feed_cache_hook(self, requests[i][0], r)
        return res

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        _say("rolling", "shared-context scorer: loglikelihood_rolling requests use HFLM's path")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return generate_until_shared(
            self,
            requests,
            lambda reqs: HFLM.generate_until(self, reqs, disable_tqdm=disable_tqdm),
            getattr(self, "hflm_tasks", None),
        )


class _Quiet:
    """No progress bars on any request type (mixed into an HFLM class)."""

    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return super().loglikelihood(requests, disable_tqdm=True)  # type: ignore[misc]

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return super().loglikelihood_rolling(requests, disable_tqdm=True)  # type: ignore[misc]

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        return super().generate_until(requests, disable_tqdm=True)  # type: ignore[misc]


class QuietHFLM(_Quiet, HFLM):
    """lm-eval's ``HFLM`` as is, without progress bars."""


class QuietSharedContextHFLM(_Quiet, SharedContextHFLM):
    """:class:`SharedContextHFLM` without progress bars."""


def make_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    scorer: str = "shared",
    batch_size: int = 32,
    device: str = "cpu",
    hflm_tasks: Mapping[str, str] | None = None,
) -> HFLM:
    """The lm-eval LM that scores an in-memory model, without progress bars.

    Args:
        model: a ``transformers`` causal LM on ``device`` (wrapped, not copied).
        tokenizer: its tokenizer.
        scorer: ``"shared"`` (:class:`SharedContextHFLM`) or ``"hflm"`` (lm-eval's ``HFLM`` as is).
        batch_size: sequences per forward pass.
        device: where inputs go.
        hflm_tasks: task name -> why HFLM's path generates its answers (the shared scorer runs
            the other tasks' generations with a shared prompt prefix).

    Returns:
        The ``HFLM`` (subclass) instance.

    Raises:
        ValueError: ``scorer`` is neither ``"shared"`` nor ``"hflm"``.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    cls = QuietSharedContextHFLM if scorer == "shared" else QuietHFLM
    lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    lm.hflm_tasks = dict(hflm_tasks or {})
    return lm


class MemoLM(LM):
    """An lm-eval ``LM`` that forwards to ``inner`` the requests it has not answered yet and answers
    the others from memory (one candidate's: never share it between models).

    Args:
        inner: the candidate's lm-eval LM.
    """

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.memo: dict[tuple[str, str, int], Any] = {}

    def _answer(self, kind: str, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        # The n-th copy of one request (lm-eval repeats a request for sampled generations)
        # is its own entry, so repeats keep their distinct answers.
        seen: dict[tuple[str, str], int] = defaultdict(int)
        keys = []
        for r in requests:
            base = (kind, repr(r.args))
            keys.append((*base, seen[base]))
            seen[base] += 1
        todo = {k: r for k, r in zip(keys, requests, strict=True) if k not in self.memo}
        if todo:
            self.memo.update(zip(todo, getattr(self.inner, kind)(list(todo.values())), strict=True))
        return [self.memo[k] for k in keys]

    loglikelihood = functools.partialmethod(_answer, "loglikelihood")
    loglikelihood_rolling = functools.partialmethod(_answer, "loglikelihood_rolling")
    generate_until = functools.partialmethod(_answer, "generate_until")

    # Prompts rendered with a chat template are the inner LM's (the full evaluation after staged
    # rounds must build the prompts the rounds were scored on).
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return str(self.inner.apply_chat_template(chat_history, add_generation_prompt))

    @property
    def tokenizer_name(self) -> str:
        return str(self.inner.tokenizer_name)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.inner.chat_template(chat_template)

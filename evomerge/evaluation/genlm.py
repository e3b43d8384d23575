"""lm-eval's ``generate_until`` on the shared-prefix generator, and the checks of generation tasks.

:func:`generate_until_shared` answers an ``HFLM``'s ``generate_until`` requests with
:func:`~evomerge.evaluation.generate.generate_shared`, with HFLM's own steps around it: the context is
encoded and left-truncated by ``tok_batch_encode`` to ``max_length - max_gen_toks`` tokens, the
stop sequences are ``until`` plus the end-of-text token's text, the generation is decoded by
``tok_decode`` and cut at the first stop sequence by lm-eval's ``postprocess_generated_text``. Each
task's requests form one group, so its few-shot prefix runs once per call.

What the fast path does not do goes to HFLM's ``generate_until`` with one log line saying why:
sampling or generation arguments other than ``until``/``max_gen_toks``/``do_sample``/``temperature``,
a model whose ``generation_config`` changes greedy search (beams, repetition penalty...), thinking
tokens, several processes, ``batch_size="auto"``, prompts too long for a sliding attention window,
and tasks :func:`check_generation_tasks` sends there (filter steps that are not lm-eval's own).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.compat import feed_cache_hook, task_filters
from evomerge.evaluation.base import say_once
from evomerge.evaluation.generate import GenRequest, GenStats, generate_shared
from evomerge.evaluation.kv import sliding_window

__all__ = [
    "generate_until_shared",
    "hflm_only",
    "GenerationChecks",
    "check_generation_tasks",
    "context_length",
    "DEFAULT_MAX_GEN_TOKS",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks when a task sets none

# generation_config fields that change what greedy search picks, and their values that do not.
_GREEDY_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "encoder_repetition_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "max_new_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "stop_strings": (None,),
    "dola_layers": (None,),
    "guidance_scale": (None, 1, 1.0),
    "prompt_lookup_num_tokens": (None,),
    "max_time": (None,),
    "watermarking_config": (None,),
    "token_healing": (None, False),
}
_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}
_MAX_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


_say_once = functools.partial(say_once, log=logger, level=logging.WARNING)


def hflm_only(lm: Any) -> str:
    """Why an ``HFLM`` runs only its own paths ("" when evomerge's may run): a seq2seq model,
    ``batch_size="auto"``, several processes.

    Args:
        lm: the ``HFLM`` (or subclass) instance.

    Returns:
        The reason, or "".
    """
    if lm.backend != "causal":
        return f"a {lm.backend} model"
    if not str(lm.batch_size).isdigit():
        return f"batch_size={lm.batch_size}"
    if lm.world_size > 1:
        return "several processes"
    return ""


def _lm_reason(lm: Any) -> str:
    """Why none of this LM's generations can take the fast path ("" when they can)."""
    if why := hflm_only(lm):
        return why
    if getattr(lm, "think_end_token", None) is not None:
        return "think_end_token is set"
    if getattr(lm, "truncation", False):
        return "truncation=True"
    config = getattr(lm.model, "generation_config", None)
    for name, neutral in _GREEDY_NEUTRAL.items():
        value = getattr(config, name, None)
        if value not in neutral:
            return f"the model's generation_config sets {name}={value!r}"
    return ""


def _kwargs_reason(gen_kwargs: Mapping[str, Any], normalized: Mapping[str, Any]) -> str:
    other = sorted(set(gen_kwargs) - _KWARGS - set(_MAX_ALIASES))
    if other:
        return f"generation_kwargs {', '.join(other)}"
    return "sampling (do_sample)" if normalized.get("do_sample") else ""


def _eos_ids(model: Any) -> list[int]:
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def generate_until_shared(
    lm: Any,
    requests: Sequence[Any],
    hflm_generate: Callable[[list[Any]], list[str]],
    hflm_tasks: Mapping[str, str] | None = None,
    stats: GenStats | None = None,
) -> list[str]:
    """HFLM's ``generate_until`` answers to ``requests``, generated with a shared prefix per task.

    Args:
        lm: the ``HFLM`` (tokenizer, ``max_length``, batch size, device and model are read from it).
        requests: lm-eval ``Instance`` objects of type ``generate_until``.
        hflm_generate: HFLM's own ``generate_until`` (for what the fast path leaves out).
        hflm_tasks: task name -> why its requests go to ``hflm_generate`` (the caller has said
            why: :class:`~evomerge.evaluation.lmeval.LMEvalEvaluator` logs it when it loads the
            tasks, so no second line here).
        stats: if given, the fast path's token counts are added to it.

    Returns:
        The generated strings, in request order, cut at the first stop sequence as HFLM cuts them.

    Raises:
        ValueError: a request whose ``max_gen_toks`` leaves no room for its context (HFLM asserts).
    """
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )

    why = _lm_reason(lm)
    if why:
        _say_once(why, f"generation: {why}: generate_until requests use HFLM's path")
        return hflm_generate(list(requests))
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    window = sliding_window(lm.model)
    mine: list[tuple[int, GenRequest, list[str]]] = []
    rest: list[int] = []
    for i, r in enumerate(requests):
        context, gen_kwargs = r.args
        kw = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)
        task = getattr(r, "task_name", None)
        why = "" if task in (hflm_tasks or {}) else _kwargs_reason(gen_kwargs, kw)
        if why:
            _say_once(f"{task}:{why}", f"generation: task {task}: {why}: HFLM's path")
        if why or task in (hflm_tasks or {}):
            rest.append(i)
            continue
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        max_gen = int(kw.pop("max_gen_toks"))
        max_ctx = lm.max_length - max_gen
        if max_ctx <= 0:
            raise ValueError(
                f"task {task}: max_gen_toks ({max_gen}) must be less than the model's context ({lm.max_length} tokens)"
            )
        ids, _ = lm.tok_batch_encode([context], left_truncate_len=max_ctx)
        tokens = ids[0].tolist()
        if window is not None and len(tokens) + max_gen > window // 2:
            _say_once(
                "window",
                f"generation: prompts longer than half the sliding window ({window}) with their answer use HFLM's path",
            )
            rest.append(i)
            continue
        mine.append((i, GenRequest(tokens, tuple(until), max_gen, group=task), until))
    out: list[Any] = [None] * len(requests)
    if rest:
        for i, s in zip(rest, hflm_generate([requests[i] for i in rest]), strict=True):
            out[i] = s
    got = generate_shared(
        lm.model,
        lm.tokenizer,
        [g for _, g, _ in mine],
        batch_size=int(lm.batch_size),
        eos_ids=_eos_ids(lm.model),
        device=lm.device,
        autocast_dtype=getattr(lm, "mixed_precision_dtype", None),
        stats=stats,
    )
    for (i, _, until), tokens in zip(mine, got, strict=True):
        out[i] = postprocess_generated_text(lm.tok_decode(tokens), stop=until, think_end_token=None)
        feed_cache_hook(lm, requests[i].args, out[i], "generate_until")
    return out


# ----------------------------------------------------------------------------- task checks


@dataclass
class GenerationChecks:
    """What :func:`check_generation_tasks` found: tasks whose answers HFLM's path generates (and
    why), lines to show once, and errors that stop a search before its first trial."""

    hflm_tasks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def context_length(config: Mapping[str, Any] | Any, tokenizer: Any = None) -> int:
    """The context length HFLM gives a model: ``n_positions``, ``max_position_embeddings`` or
    ``n_ctx`` of its (text) config, else the tokenizer's ``model_max_length``, else 2048.

    Args:
        config: the model's ``config.json`` as a mapping, or a ``PretrainedConfig``.
        tokenizer: its tokenizer (None: not consulted).

    Returns:
        The length in tokens.
    """

    def get(c: Any, key: str) -> Any:
        return c.get(key) if isinstance(c, Mapping) else getattr(c, key, None)

    cfg = get(config, "text_config") or config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = get(cfg, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    tok_max = getattr(tokenizer, "model_max_length", None)
    return tok_max if isinstance(tok_max, int) and tok_max < 10**12 else 2048


def _filter_reason(task: Any) -> str:
    for ensemble in task_filters(task):
        for step in ensemble.filters:
            cls = getattr(step, "func", step)
            module = getattr(cls, "__module__", "") or ""
            if not module.startswith("lm_eval.filters.") or module.endswith("decontamination"):
                return f"filter {ensemble.name!r} runs {getattr(cls, '__name__', cls)} ({module}), not one of lm-eval's own filters"
    return ""


def check_generation_tasks(
    tasks: Mapping[str, Any], max_length: int | None = None
) -> GenerationChecks:
    """Check the generation tasks among ``tasks`` before any model runs.

    Args:
        tasks: leaf task name -> lm-eval ``Task``.
        max_length: the models' context length (None: not checked).

    Returns:
        The :class:`GenerationChecks`: a task without a stop sequence is a note (it generates its
        whole budget unless the model ends it); ``max_gen_toks`` at or over ``max_length`` is an
        error; sampling, other generation arguments and filter steps that are not lm-eval's own
        send the task to HFLM's path, with a note.
    """
    from lm_eval.models.utils import normalize_gen_kwargs

    out = GenerationChecks()
    for name, task in tasks.items():
        if getattr(task, "OUTPUT_TYPE", None) != "generate_until":
            continue
        gen_kwargs = dict(getattr(task.config, "generation_kwargs", None) or {})
        kw = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        max_gen = int(kw["max_gen_toks"])
        if max_length is not None and max_gen >= max_length:
            out.errors[name] = (
                f"task {name!r} generates up to {max_gen} tokens (generation_kwargs.max_gen_toks), which must be "
                f"less than the model's context of {max_length} tokens, leaving room for the prompt"
            )
        if not [s for s in kw.get("until") or [] if s]:
            out.notes.append(
                f"task {name!r} has no stop sequence (generation_kwargs.until): each answer runs to {max_gen} tokens unless the model ends it"
            )
        why = _kwargs_reason(gen_kwargs, kw) or _filter_reason(task)
        if why:
            out.hflm_tasks[name] = why
            out.notes.append(f"task {name!r}: {why}: its answers are generated by HFLM's path")
    return out

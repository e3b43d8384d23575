"""Every use evomerge makes of a private part of Optuna, lm-eval or transformers, in one place.

These libraries may change their private parts in any release; pyproject.toml bounds them at the
newest versions tested, and ``tests/test_compat.py`` has one test per use, so an upgrade that
breaks one fails there, naming it. Each function below is the only place evomerge touches what its
docstring names.

Optuna:
    - ``Study._get_trials(deepcopy, states, use_cache)``: the method Optuna's samplers read a
      study's trials through. :class:`evomerge.search.samplers.StoppedAsEstimated` hands the
      samplers a view of the study that defines a method of that name (:data:`SAMPLER_TRIALS`)
      and reads the real trials with :func:`study_trials`.

lm-eval:
    - ``HFLM._loglikelihood_tokens(requests, disable_tqdm, override_bs)``: the method
      ``HFLM.loglikelihood`` hands tokenized ``(key, context tokens, continuation tokens)``
      requests to. The shared-context scorer overrides it (:data:`HFLM_TOKENS`) and calls HFLM's
      own with :func:`hflm_loglikelihood_tokens`.
    - ``LM.cache_hook.add_partial``: how an LM reports each answer to lm-eval's response cache
      (:func:`feed_cache_hook`).
    - ``Task._filters``: a task's filter ensembles, which turn responses into the values its
      metrics score (:func:`task_filters`).
    - ``Task.build_all_requests(...)``: builds a task's requests for chosen docs
      (:func:`build_task_requests`).
    - the module global ``lm_eval.api.task.tqdm``: the progress bar request building draws per
      task (:func:`quiet_task_progress`).

transformers:
    - ``no_init_weights`` (``transformers.initialization`` from 5.0, ``transformers.modeling_utils``
      before): builds a model without initializing weights that are written next
      (:func:`no_init_weights`).
    - ``AutoModelForCausalLM._model_mapping``: which config classes the auto class builds
      (:func:`has_causal_lm_class`).
    - ``PreTrainedModel._from_config``: builds a named model class from a config
      (:func:`can_build_from_config`, :func:`model_from_config`).
    - ``transformers.core_model_loading.revert_weight_conversion`` (from 5.0): the renaming from a
      model's parameter names to its checkpoint names (:func:`checkpoint_renaming`).
    - the environment variable ``TRANSFORMERS_SDPA_FORCE_GQA``, read by transformers' SDPA
      attention at each call: grouped key/value heads go to the kernel as they are
      (:func:`sdpa_grouped_heads`).

Every library is imported lazily, on first use.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

__all__ = [
    "SAMPLER_TRIALS",
    "HFLM_TOKENS",
    "study_trials",
    "hflm_loglikelihood_tokens",
    "feed_cache_hook",
    "build_task_requests",
    "task_filters",
    "quiet_task_progress",
    "no_init_weights",
    "has_causal_lm_class",
    "can_build_from_config",
    "model_from_config",
    "checkpoint_renaming",
    "sdpa_grouped_heads",
    "attention_implementations",
    "attention_implementation",
]

SAMPLER_TRIALS = "_get_trials"
"""The name of the ``Study`` method Optuna's samplers read trials through; a view of a study that
the samplers are given defines a method of this name."""

HFLM_TOKENS = "_loglikelihood_tokens"
"""The name of the ``HFLM`` method that scores tokenized loglikelihood requests; a subclass that
scores them its own way overrides it."""


# --- Optuna -------------------------------------------------------------------------------------


def study_trials(
    study: Any,
    *,
    deepcopy: bool = True,
    states: Container[Any] | None = None,
    use_cache: bool = False,
) -> list[Any]:
    """A study's trials as Optuna's samplers read them (``Study._get_trials``).

    Args:
        study: an ``optuna.Study``.
        deepcopy: copy each trial (as ``Study.get_trials`` does).
        states: keep only trials in these ``TrialState``\\ s; None keeps all.
        use_cache: let the storage answer finished trials from its cache (what the samplers ask
            for inside a trial).

    Returns:
        The ``FrozenTrial``\\ s, by trial number.
    """
    return list(study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache))


# --- lm-eval --------------------------------------------------------------------------------------


def hflm_loglikelihood_tokens(
    lm: Any,
    requests: Sequence[Any],
    *,
    disable_tqdm: bool = False,
    override_bs: int | None = None,
) -> list[tuple[float, bool]]:
    """HFLM's own scoring of tokenized loglikelihood requests, also for a subclass that overrides it.

    Args:
        lm: an ``lm_eval.models.huggingface.HFLM`` (or subclass) instance.
        requests: ``(key, context tokens, continuation tokens)`` tuples, as
            ``HFLM.loglikelihood`` builds them (``key`` is the ``(context, continuation)`` text).
        disable_tqdm: no progress bar.
        override_bs: a batch size instead of the LM's.

    Returns:
        ``(log-likelihood, is_greedy)`` per request, in order.
    """
    from lm_eval.models.huggingface import HFLM

    return list(
        getattr(HFLM, HFLM_TOKENS)(
            lm, list(requests), disable_tqdm=disable_tqdm, override_bs=override_bs
        )
    )


def feed_cache_hook(lm: Any, key: Any, result: Any, kind: str = "loglikelihood") -> None:
    """Report one answer to the LM's response-cache hook, as HFLM does for each request.

    The hook stores nothing unless lm-eval's ``CachingLM`` wraps the LM (``use_cache``), which
    evomerge never does; it is fed so that such a wrapper sees every answer.

    Args:
        lm: an lm-eval ``LM``.
        key: the request's key (for loglikelihood: the ``(context, continuation)`` text).
        result: the answer.
        kind: the request type.
    """
    lm.cache_hook.add_partial(kind, key, result)


def build_task_requests(task: Any, doc_ids: Sequence[int], chat: Any = None) -> None:
    """Build an lm-eval task's requests for the docs ``doc_ids``, into ``task.instances``.

    Each instance's ``doc_id`` is its doc's position in ``doc_ids``.

    Few-shot examples are drawn from the task's sampler where it stands; reseed it first
    (``task.set_fewshot_seed``) for the prompts a full evaluation gives. Nothing is cached on disk,
    no system instruction is applied, and one process builds every request.

    Args:
        task: an lm-eval ``Task``.
        doc_ids: the eval docs to build, by index.
        chat: an lm-eval LM whose chat template renders each prompt, the few-shot examples as
            turns (what ``evaluate(apply_chat_template=True, fewshot_as_multiturn=True)`` builds);
            None: plain prompts.
    """
    task.build_all_requests(
        limit=None,
        samples=list(doc_ids),
        rank=0,
        world_size=1,
        cache_requests=False,
        rewrite_requests_cache=False,
        system_instruction=None,
        apply_chat_template=chat is not None,
        fewshot_as_multiturn=chat is not None,
        chat_template=getattr(chat, "apply_chat_template", None),
        tokenizer_name=getattr(chat, "tokenizer_name", ""),
    )


def task_filters(task: Any) -> list[Any]:
    """An lm-eval task's filter ensembles (``Task._filters``), in the order lm-eval applies them.

    Each ensemble has a ``name`` (the filter key of the task's results: ``none``,
    ``strict-match``...) and ``filters``, its steps (lm-eval builds each step with
    ``functools.partial`` of a ``Filter`` class, or as the class's instance).

    Args:
        task: an lm-eval ``Task``.

    Returns:
        The ensembles; ``[]`` for an object without any.
    """
    return list(getattr(task, "_filters", None) or [])


@contextmanager
def quiet_task_progress() -> Iterator[None]:
    """Within the block, lm-eval builds requests without a progress bar per task.

    lm-eval draws a tqdm bar per task per call while it builds requests (the module global
    ``lm_eval.api.task.tqdm``); a search prints its own progress. The global is restored on exit,
    also after an exception. Not thread-safe: the global is shared by the process.
    """
    import lm_eval.api.task as lm_task

    bar = lm_task.tqdm
    lm_task.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        lm_task.tqdm = bar


# --- transformers -------------------------------------------------------------------------------


def no_init_weights() -> AbstractContextManager[Any]:
    """transformers' context in which a model is built without initializing its weights.

    For a model whose every weight is written next: random initialization of a large model costs
    seconds.

    Returns:
        The context manager (``transformers.initialization.no_init_weights``, or
        ``transformers.modeling_utils.no_init_weights`` on transformers 4.x).
    """
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights as ctx  # type: ignore[attr-defined,no-redef]
    return ctx()


def has_causal_lm_class(config: Any) -> bool:
    """Whether ``AutoModelForCausalLM`` builds a model for this config's class.

    Args:
        config: a ``transformers.PretrainedConfig``.

    Returns:
        True when the auto class maps the config's class (or transformers no longer exposes the
        mapping, so the auto class must be tried); False for a model type it has no class for (a
        vision-language model such as LLaVA).
    """
    from transformers import AutoModelForCausalLM

    mapping = getattr(AutoModelForCausalLM, "_model_mapping", None)  # config class -> model class
    return mapping is None or type(config) in mapping


def can_build_from_config(cls: Any) -> bool:
    """Whether :func:`model_from_config` can build ``cls`` (a transformers model class).

    Args:
        cls: any object, typically ``getattr(transformers, architectures[0], None)``.

    Returns:
        True for a ``PreTrainedModel`` subclass.
    """
    return cls is not None and hasattr(cls, "_from_config")


def model_from_config(cls: Any, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """A model of class ``cls`` built from ``config`` with parameters of ``dtype``.

    Unlike ``AutoModelForCausalLM.from_config``, this takes a concrete class, such as the one a
    checkpoint's ``architectures`` names. Wrap it in :func:`no_init_weights` to skip the random
    initialization.

    Args:
        cls: a ``transformers.PreTrainedModel`` subclass.
        config: its config.
        dtype: the parameters' dtype.

    Returns:
        The model, on the CPU, in training mode.
    """
    return cls._from_config(config, dtype=dtype)


def checkpoint_renaming(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The model's tensors under the names ``save_pretrained`` writes them with.

    transformers 5 converts some checkpoints as it loads them (LLaVA's ``language_model.model.*``
    become ``model.language_model.*``; some models' expert tensors are fused) and reverts the
    conversion as it saves. This applies the save-time reversion to ``state``.

    Args:
        model: a transformers model.
        state: its ``state_dict()`` (``keep_vars=True`` keeps the parameters themselves).

    Returns:
        ``{checkpoint name: tensor}``: for a plain renaming the tensors are ``state``'s own
        objects; a tensor fused or split on save is a new one. None on transformers 4.x, where
        checkpoint and parameter names are the same.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x
        return None
    typed: Any = model  # typed as PreTrainedModel there; any transformers model is one
    return dict(revert_weight_conversion(typed, dict(state)))


@contextmanager
def sdpa_grouped_heads(device: torch.device) -> Iterator[None]:
    """On CPU, within the block, transformers' SDPA attention hands grouped key/value heads to
    ``scaled_dot_product_attention`` as they are (``enable_gqa``) instead of repeating them for
    every query head, a copy of the whole cache per layer per forward that the CPU kernel does not
    need; the results are the same. On other devices, or where the variable is set already,
    nothing changes (their fast kernels take no mask with grouped heads).

    Not thread-safe: the environment is the process's.

    Args:
        device: where the forwards run.
    """
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or os.environ.get(name) is not None:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _attention_configs(model: torch.nn.Module) -> list[Any]:
    """The distinct configs of ``model`` and its submodules that choose an attention function."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def attention_implementations(model: torch.nn.Module) -> set[str]:
    """The attention implementations (``"sdpa"``, ``"eager"``, ...) ``model``'s configs name
    (``PretrainedConfig._attn_implementation``; a vision-language model has one per tower).

    Args:
        model: a ``transformers`` model.
    """
    return {str(c._attn_implementation) for c in _attention_configs(model)}


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Within the block, every config of ``model`` names the attention function ``name`` (one
    registered with ``transformers.AttentionInterface``); each config's own is restored on exit.
    Not thread-safe: the configs are the model's.

    Args:
        model: a ``transformers`` model.
        name: the registered attention function.
    """
    configs = _attention_configs(model)
    before = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = name
    try:
        yield
    finally:
        for c, old in zip(configs, before, strict=True):
            c._attn_implementation_internal = old

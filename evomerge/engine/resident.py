"""The model a search merges into: built once per output layout, its parameters found by checkpoint name.

A plan names its tensors as the source checkpoints do. For most causal LMs those are the names of
the model's own parameters. A model whose checkpoint layout differs from its module tree (LLaVA:
the checkpoint's ``vision_tower.*`` and ``language_model.model.*`` are the modules
``model.vision_tower.*`` and ``model.language_model.*`` under transformers 5) is matched through
transformers' own save-time renaming (``revert_weight_conversion``), so a merged tensor lands in the
parameter that ``from_pretrained`` would have loaded it into. A model whose checkpoint tensors are
computed from its parameters (fused or split on save) is refused in one line: writing a merged
tensor there would not reach the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from evomerge.compat import (
    can_build_from_config,
    checkpoint_renaming,
    has_causal_lm_class,
    model_from_config,
    no_init_weights,
)
from evomerge.dtypes import torch_dtype
from evomerge.errors import EvomergeError

__all__ = ["build_model", "checkpoint_targets", "copy_into"]


def build_model(config: Mapping[str, Any], dtype: str, device: torch.device) -> torch.nn.Module:
    """A ``transformers`` model for an output ``config.json``, weights unset, in eval mode.

    A causal LM is built with ``AutoModelForCausalLM``; a model that class does not take (a
    vision-language model) with the class its ``architectures`` names.

    Args:
        config: the output config (a plan's ``out_config``).
        dtype: the dtype name of its parameters.
        device: where it lives.

    Returns:
        The model.

    Raises:
        EvomergeError: transformers does not know the model type, or has no class for it.
    """
    import transformers
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise EvomergeError(
            f"in-memory merge: transformers does not know model_type {model_type!r}"
        )
    cfg = CONFIG_MAPPING[str(model_type)].from_dict(dict(config))
    archs = list(config.get("architectures") or [])
    cls: Any = AutoModelForCausalLM
    if not has_causal_lm_class(cfg):
        named = getattr(transformers, archs[0], None) if archs else None
        if not can_build_from_config(named):
            raise EvomergeError(
                f"in-memory merge: transformers has no causal LM class for model_type {model_type!r} (architectures: {archs})"
            )
        cls = named
    with no_init_weights():
        model = (
            cls.from_config(cfg, dtype=torch_dtype(dtype))
            if cls is AutoModelForCausalLM
            else model_from_config(cls, cfg, torch_dtype(dtype))
        )
    return model.to(device).eval()


def checkpoint_targets(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by the checkpoint names of ``names``.

    Args:
        model: a model from :func:`build_model`.
        names: the tensor names a plan writes.

    Returns:
        ``{checkpoint name: the model's tensor}`` for every name the model holds.

    Raises:
        EvomergeError: the model's checkpoint tensors are not its own parameters (transformers
            fuses or splits them when it saves).
    """
    own = dict(model.state_dict(keep_vars=True))
    if all(n in own for n in names):
        return own
    renamed = checkpoint_renaming(model, own)
    if renamed is None:  # transformers 4.x: checkpoint and module names are the same
        return own
    ids = {id(t) for t in own.values()}
    converted = sorted(n for n, t in renamed.items() if id(t) not in ids)
    if converted:
        raise EvomergeError(
            f"in-memory merge: transformers converts {type(model).__name__}'s tensor {converted[0]} when it saves (not a plain renaming); merge to disk with evomerge merge instead"
        )
    return dict(renamed)


def copy_into(targets: Mapping[str, torch.Tensor]) -> Callable[[str, torch.Tensor], None]:
    """A merge sink that copies each merged tensor into the model tensor of its name.

    Args:
        targets: the model's tensors by checkpoint name (:func:`checkpoint_targets`).

    Returns:
        ``sink(name, tensor)``; it raises :class:`EvomergeError` when the shapes differ (the model
        was built for another layout), and copies nothing when a fused kernel already wrote there.
    """

    def sink(name: str, tensor: torch.Tensor) -> None:
        dst = targets[name]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise EvomergeError(
                f"in-memory merge: {name} is {list(tensor.shape)} but the model holds {list(dst.shape)}"
            )
        if tensor.data_ptr() != dst.data_ptr():
            dst.data.copy_(tensor)

    return sink

"""Layer naming, read from the checkpoint instead of hard-wired per architecture.

A decoder checkpoint is a few tensors before the layers (embeddings), a numbered stack of
identical layers, and a few after (final norm, lm_head). The stack is the dotted prefix followed by
a number whose distinct values match the config's layer count: ``model.layers.N.`` (Llama, Mistral,
Qwen2, Gemma, Phi-3), ``transformer.h.N.`` (GPT-2), ``model.language_model.layers.N.`` and so on.
Other numbered stacks (a vision tower, say) are not sliced: their tensors are merged like the
tensors outside the layers, each at the relative depth of its layer within its own stack (as
mergekit merges the modules of a vision-language model). When a vision stack has as many layers as
the language model (LLaVA: ``vision_tower.encoder.layers`` and ``language_model.model.layers``), the
language stack is told apart by its name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.recipe.modules import OTHER_MODULE_HINTS

__all__ = ["Arch", "detect_arch", "is_other_module", "is_pre_tensor", "LAYER_COUNT_KEYS"]

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_NUMBERED = re.compile(
    r"^(?P<prefix>(?:[A-Za-z_][\w]*\.)*?[A-Za-z_][\w]*)\.(?P<index>\d+)\.(?P<rest>.+)$"
)
# Stacks that are not the language model's, and names that are, when several match the layer count.
_OTHER_HINTS = OTHER_MODULE_HINTS
_TEXT_HINTS = ("language_model", "text_model", "llm")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "tok_embeddings")


@dataclass(frozen=True)
class Arch:
    """Where the layers are in one checkpoint.

    Attributes:
        model_type: config ``model_type`` (for compatibility checks).
        architectures: config ``architectures``.
        layer_prefix: dotted prefix of the layer stack, e.g. ``model.layers``; None if no stack.
        num_layers: number of layers.
        count_key: path of the layer count in config.json, e.g. ``("num_hidden_layers",)`` or
            ``("text_config", "num_hidden_layers")``.
        other_stacks: the other numbered stacks (a vision tower's layers), as ``(prefix, count)``.
    """

    model_type: str
    architectures: tuple[str, ...]
    layer_prefix: str | None
    num_layers: int
    count_key: tuple[str, ...] | None
    other_stacks: tuple[tuple[str, int], ...] = ()

    def split(self, name: str) -> tuple[int, str] | None:
        """``(layer index, name within the layer)`` for a layer tensor, else None."""
        if self.layer_prefix is None or not name.startswith(self.layer_prefix + "."):
            return None
        rest = name[len(self.layer_prefix) + 1 :]
        index, _, suffix = rest.partition(".")
        if not index.isdigit() or not suffix:
            return None
        return int(index), suffix

    def depth(self, name: str) -> float:
        """Relative depth of a tensor outside the layer stack: ``i / (n - 1)`` in another stack of n, else 0.

        Example:
            >>> a = Arch("llava", (), "language_model.model.layers", 2, None, (("vision_tower.encoder.layers", 3),))
            >>> a.depth("vision_tower.encoder.layers.1.mlp.fc1.weight"), a.depth("vision_tower.post_layernorm.weight")
            (0.5, 0.0)
        """
        for prefix, n in self.other_stacks:
            if name.startswith(prefix + "."):
                index = name[len(prefix) + 1 :].partition(".")[0]
                if index.isdigit():
                    return int(index) / (n - 1) if n > 1 else 1.0
        return 0.0

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{index}.{suffix}"

    def compatible(self, other: Arch) -> bool:
        return self.model_type == other.model_type and self.architectures == other.architectures


def is_other_module(name: str) -> bool:
    """Whether a tensor belongs to another module than the language model (a vision tower, a projector).

    Example:
        >>> is_other_module("multi_modal_projector.linear_1.weight"), is_other_module("model.norm.weight")
        (True, False)
    """
    low = name.lower()
    return any(h in low for h in _OTHER_HINTS)


def is_pre_tensor(name: str) -> bool:
    """Whether a non-layer tensor sits before the layers (embeddings) rather than after."""
    return any(h in name for h in _PRE_HINTS) and "lm_head" not in name


def layer_count(config: Mapping[str, Any]) -> tuple[int | None, tuple[str, ...] | None]:
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key], (key,)
    for sub in ("text_config", "language_config", "llm_config"):
        nested = config.get(sub)
        if isinstance(nested, Mapping):
            n, path = layer_count(nested)
            if n is not None and path is not None:
                return n, (sub, *path)
    return None, None


def detect_arch(config: Mapping[str, Any], tensor_names: Iterable[str]) -> Arch:
    """Find the layer stack of a checkpoint from its config and tensor names.

    Example:
        >>> a = detect_arch({"model_type": "gpt2", "n_layer": 2}, ["transformer.wte.weight",
        ...     "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"])
        >>> a.layer_prefix, a.num_layers, a.split("transformer.h.1.attn.c_attn.weight")
        ('transformer.h', 2, (1, 'attn.c_attn.weight'))
    """
    stacks: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for name in tensor_names:
        m = _NUMBERED.match(name)
        if m:
            prefix = m.group("prefix")
            stacks.setdefault(prefix, set()).add(int(m.group("index")))
            counts[prefix] = counts.get(prefix, 0) + 1
    n_config, key = layer_count(config)
    prefix = None
    if stacks:
        matching = [
            p for p, idx in stacks.items() if n_config is not None and idx == set(range(n_config))
        ]
        if matching:
            prefix = max(matching, key=lambda p: _rank(p, counts[p]))
        elif n_config is None:
            prefix = max(stacks, key=lambda p: _rank(p, counts[p]))
    num = len(stacks[prefix]) if prefix is not None else 0
    # Another module's stack (a vision tower: its name says so, its indices run 0..n-1); any other
    # numbered tensor stays an ordinary tensor outside the layers, as mergekit's architectures have it.
    others = tuple(
        sorted(
            (p, len(idx))
            for p, idx in stacks.items()
            if p != prefix and idx == set(range(len(idx))) and is_other_module(p)
        )
    )
    archs = config.get("architectures") or ()
    return Arch(
        str(config.get("model_type", "")),
        tuple(archs),
        prefix,
        num,
        key if prefix is not None else None,
        others,
    )


def _rank(prefix: str, count: int) -> tuple[bool, bool, int]:
    low = prefix.lower()
    return (any(h in low for h in _TEXT_HINTS), not any(h in low for h in _OTHER_HINTS), count)

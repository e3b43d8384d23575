"""Mixtures of experts (``evomerge moe``): mergekit-moe configurations built into Mixtral models.

:mod:`.config` validates the configuration, :mod:`.router` computes router weights by
``gate_mode``, :mod:`.build` assembles the tensors, :mod:`.write` writes a model directory (or
builds the model in memory) and :mod:`.card` its model card.
"""

from evomerge.moe.build import MoEBuilder, MoELayout, MoEResult
from evomerge.moe.config import (
    GATE_MODES,
    Expert,
    MoEConfig,
    is_moe_mapping,
    load_moe_config,
    parse_moe_config,
)
from evomerge.moe.write import moe_in_memory, moe_to_disk

__all__ = [
    "GATE_MODES",
    "Expert",
    "MoEBuilder",
    "MoEConfig",
    "MoELayout",
    "MoEResult",
    "is_moe_mapping",
    "load_moe_config",
    "moe_in_memory",
    "moe_to_disk",
    "parse_moe_config",
]

"""mergekit's merge-configuration schema, loaded strictly (:mod:`.schema`)."""

from evomerge.recipe.schema import (
    Cond,
    InputModel,
    MergeConfig,
    OutputSlice,
    Setting,
    load_recipe,
    parse_recipe,
)

__all__ = [
    "Cond",
    "InputModel",
    "MergeConfig",
    "OutputSlice",
    "Setting",
    "load_recipe",
    "parse_recipe",
]

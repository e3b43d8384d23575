"""A validated merge recipe as data: the models, slices and parameter settings that
:mod:`evomerge.recipe.schema` builds from mergekit's YAML."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evomerge.io import dump_yaml
from evomerge.methods.registry import METHODS
from evomerge.methods.spec import Method

__all__ = ["Scalar", "Cond", "Setting", "InputModel", "OutputSlice", "MergeConfig"]

Scalar = bool | int | float | str | None


@dataclass(frozen=True)
class Cond:
    """One ``{filter, value}`` entry of a setting; ``filter`` None matches every tensor."""

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


Setting = Scalar | tuple[Scalar, ...] | tuple[Cond, ...]


@dataclass(frozen=True)
class InputModel:
    """A model in ``models:`` or a source in a slice."""

    model: str
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class OutputSlice:
    """One ``slices:`` entry: sources merged layer by layer into consecutive output layers."""

    sources: tuple[InputModel, ...]
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    base_model: str | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated recipe. ``raw`` keeps the mapping it came from, for writing it back out."""

    merge_method: str
    models: tuple[InputModel, ...] | None = None
    slices: tuple[OutputSlice, ...] | None = None
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    source_file: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # A modules: recipe of several modules read as models: (evomerge.recipe.modules): each module's
    # layer_range end, for the planner to check that it covers a whole layer stack.
    module_spans: tuple[tuple[str, int], ...] = ()

    @property
    def method(self) -> Method:
        return METHODS[self.merge_method]

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in order of appearance."""
        seen: list[str] = [self.base_model] if self.base_model else []
        for s in self.slices or ():
            if s.base_model:
                seen.append(s.base_model)
        for src in self.all_inputs():
            seen.append(src.model)
        return list(dict.fromkeys(seen))

    def all_inputs(self) -> list[InputModel]:
        if self.models is not None:
            return list(self.models)
        return [src for s in self.slices or () for src in s.sources]

    def to_yaml(self) -> str:
        """The recipe as mergekit-compatible YAML (numeric lists in flow style)."""
        return dump_yaml(dict(self.raw))

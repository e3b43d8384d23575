"""Search spaces: a mergekit recipe in which any value may be a search directive.

A directive is a small mapping put where a plain value would go::

    weight:  {range: [0.1, 1.0]}              # float, uniform
    lambda:  {range: [0.5, 2.0], log: true}   # float, log-uniform (also: step: 0.05)
    density: {range: [0.2, 1.0], per_layers: 8}   # one value per group of 8 layers
    t:       {range: [0, 1], anchors: 5}      # a gradient: 5 searched anchor values
    merge_method: {choice: [ties, dare_ties, task_arithmetic]}
    layer_range: [{int: [0, 8]}, {int: [16, 32]}] # start and end searched (passthrough)

``choice`` may appear wherever a plain value may (method, dtype, a model reference...). When the
method is a choice, each method's own parameters are only sampled (and only written) when that
method is chosen: a parameter the chosen method does not declare is left out of the recipe.

Rendering a space at a point gives a plain recipe mapping that :func:`evomerge.recipe.schema.parse_recipe`
accepts, so everything after sampling is the ordinary merge path. A plain mergekit recipe is a
space with no directives: exactly one point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.dataflow.section import section_model_refs
from evomerge.evaluation.base import EvalConfig
from evomerge.space.directives import Directive, LayersOf, Suggest
from evomerge.space.moe import Prompts, moe_model_refs
from evomerge.space.prune import PruneSettings
from evomerge.space.render import render, values_of

__all__ = ["Space", "SearchSettings"]


@dataclass(frozen=True)
class SearchSettings:
    """The ``search:`` section."""

    # tpe with pruning (the default) or several objectives; gp with `prune: false` and one
    # objective (the parser sets it)
    sampler: str = "tpe"
    trials: int = 40
    seed: int = 0
    finalists: int = 5
    baselines: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    objectives: tuple[str, ...] = ()
    startup_trials: int | None = None
    mask_seed: int | None = None  # seed of random masks (dare, della); None: ``seed``
    prune: PruneSettings | None = PruneSettings()  # stop hopeless candidates early; None: off
    # search items the searched trials may score in all (a budget beside trials); None: no limit
    items: int | None = None


@dataclass(frozen=True)
class Space:
    """A parsed search space.

    Attributes:
        file: the space file (for messages) and ``base_dir`` (relative paths in it).
        tree: the recipe with :class:`Directive` objects where values are searched.
        directives: every directive, in file order.
        evaluation: the ``evaluate:`` section (None when absent: an evaluator is then given to
            the search); its task names are looked up when the evaluator loads the tasks.
        search: the ``search:`` settings.
        study_name, storage: the ``study:`` section (``None`` when absent).
    """

    file: str
    base_dir: Path
    tree: dict[str, Any]
    directives: list[Directive]
    evaluation: EvalConfig | None
    search: SearchSettings
    study_name: str | None = None
    storage: str | None = None

    @property
    def is_fixed(self) -> bool:
        """True for a plain recipe (one point)."""
        return not self.directives

    def model_refs(self) -> list[str]:
        """Every model reference the space can use (choices included), base first."""
        out: list[str] = []

        def add(v: Any) -> None:
            if isinstance(v, Directive):
                for c in v.choices:
                    add(c)
            elif isinstance(v, str) and v not in out:
                out.append(v)

        add(self.tree.get("base_model"))
        for m in self.tree.get("models") or ():
            add(m.get("model"))
        for s in self.tree.get("slices") or ():
            add(s.get("base_model"))
            for src in s.get("sources") or ():
                add(src.get("model"))
        for ref in moe_model_refs(self.tree.get("moe")):
            add(ref)
        for ref in section_model_refs(self.tree.get("dataflow")):
            add(ref)
        modules = self.tree.get("modules")  # a modules: recipe (no directives inside)
        for module in modules.values() if isinstance(modules, Mapping) else ():
            for m in (module.get("models") or ()) if isinstance(module, Mapping) else ():
                add(m.get("model") if isinstance(m, Mapping) else None)
            for s in (module.get("slices") or ()) if isinstance(module, Mapping) else ():
                for src in (s.get("sources") or ()) if isinstance(s, Mapping) else ():
                    add(src.get("model") if isinstance(src, Mapping) else None)
        return out

    def render(
        self, suggest: Suggest, layers_of: LayersOf, prompts: Prompts = None
    ) -> dict[str, Any]:
        """The plain recipe at the point ``suggest`` picks.

        Args:
            suggest: ``(parameter name, directive) -> value``, e.g. an Optuna trial's suggest_*.
            layers_of: number of layers of a model reference (for ``per_layers``).
            prompts: each search task's item prompts (a mixture of experts' ``from_task`` routing
                prompts); None renders placeholders.

        Returns:
            A recipe mapping (no directives left).
        """
        return render(self.tree, suggest, layers_of, prompts)

    def render_values(self, values: Mapping[str, Any], layers_of: LayersOf) -> dict[str, Any]:
        """The plain recipe at stored parameter values (a trial's ``params``)."""

        def suggest(name: str, d: Directive) -> Any:
            if name not in values:
                raise KeyError(f"no value for searched parameter {name!r}")
            return values[name]

        return self.render(suggest, layers_of)

    def values_of(self, recipe: Mapping[str, Any], layers_of: LayersOf) -> dict[str, Any] | None:
        """The parameter values that render to ``recipe`` (a hand recipe), or ``None`` when the
        recipe is not a point of this space (other structure, or values outside the ranges)."""
        return values_of(self.tree, recipe, layers_of)

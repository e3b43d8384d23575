"""Turning a recipe into a scored model: merge it into a resident model, then evaluate it.

Sources are opened once; one model per output layout is built once and every candidate's merged
tensors are written into it in place, so a trial costs a re-merge and an evaluation, no disk
round trip and no model construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from evomerge.dataflow.candidate import is_dataflow_mapping
from evomerge.dataflow.resident import ResidentPaths
from evomerge.engine.merger import Merger, MergeResult
from evomerge.engine.plan import MergePlan
from evomerge.evaluation.base import Evaluator
from evomerge.moe.config import is_moe_mapping
from evomerge.moe.resident import ResidentMoE
from evomerge.recipe.schema import parse_recipe
from evomerge.search.records import Scores

__all__ = ["Candidates"]


class Candidates:
    """Merges candidates into resident models and scores them.

    Args:
        merger: a resident :class:`~evomerge.engine.merger.Merger` over the space's sources.
        evaluator: scores a model on "search" or "holdout".
    """

    def __init__(self, merger: Merger, evaluator: Evaluator) -> None:
        self.merger = merger
        self.evaluator = evaluator
        self._models: dict[str, torch.nn.Module] = {}
        self._moe: ResidentMoE | None = None
        self._paths: ResidentPaths | None = None

    def model_for(self, plan: MergePlan) -> torch.nn.Module:
        """The resident model for the plan's output layout (built once per layout)."""
        key = json.dumps(plan.out_config, sort_keys=True, default=str) + plan.out_dtype
        model = self._models.get(key)
        if model is None:
            if len(self._models) >= 2:  # frankenmerge searches change layouts: keep memory bounded
                self._models.clear()
            model = self.merger.build_model(plan)
            self._models[key] = model
        return model

    def materialize(
        self, recipe: Mapping[str, Any], where: str
    ) -> tuple[torch.nn.Module, MergeResult]:
        """Merge ``recipe`` into its resident model; returns the model and the merge result.
        A mixture-of-experts configuration (``merge_method: moe``) is built by :class:`ResidentMoE`,
        a data-flow path (``merge_method: dataflow``) by :class:`ResidentPaths`."""
        if is_dataflow_mapping(recipe):
            self._paths = self._paths or ResidentPaths(self.merger)
            return self._paths.materialize(recipe, where)  # type: ignore[return-value]  # has .digest like MergeResult
        if is_moe_mapping(recipe):
            self._moe = self._moe or ResidentMoE(self.merger)
            return self._moe.materialize(recipe, where)  # type: ignore[return-value]  # has .digest like MergeResult
        plan = self.merger.plan(parse_recipe(dict(recipe), where))
        model = self.model_for(plan)
        return model, self.merger.merge_into(model, plan)

    def score(self, model: torch.nn.Module, split: str) -> Scores:
        """Evaluate ``model`` on ``split``.

        Raises:
            EvomergeError: a task gave no score (NaN or missing).
        """
        return self.evaluator.evaluate(model, split).checked()

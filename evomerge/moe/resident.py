"""Mixture-of-experts candidates of a search, built in memory like the merges.

A candidate is a configuration mapping (``merge_method: moe``, as a space renders it) whose experts
are model references or merge recipes ("MoE from merges"). A merged expert's MLP tensors are merged
by the search's resident :class:`~evomerge.engine.merger.Merger` (only its ``.mlp.`` tensors) and
handed to the builder in memory; the mixture is written into one resident ``MixtralForCausalLM``
per layout (number of experts, experts per token, dtype), so a trial costs a rebuild of the tensors
and no model construction or disk round trip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from evomerge.engine.merger import Merger
from evomerge.engine.sources import open_missing
from evomerge.errors import ConfigError
from evomerge.moe.build import ExpertTensors, MoEBuilder, MoEResult
from evomerge.moe.config import parse_moe_config
from evomerge.recipe.schema import parse_recipe

__all__ = ["ResidentMoE", "merged_label"]


def merged_label(recipe: Mapping[str, Any]) -> str:
    """A stable name for a merged expert (its recipe's hash), standing in for a model reference."""
    text = json.dumps(recipe, sort_keys=True, default=str)
    return f"merged-expert-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class ResidentMoE:
    """Builds mixture-of-experts candidates over a search's resident merger.

    Args:
        merger: the search's merger (its sources, device and seed are shared).
    """

    def __init__(self, merger: Merger) -> None:
        self.merger = merger
        self.builder = MoEBuilder(merger.sources, device=merger.device, seed=merger.seed)
        self._models: dict[str, torch.nn.Module] = {}

    def materialize(
        self, mapping: Mapping[str, Any], where: str
    ) -> tuple[torch.nn.Module, MoEResult]:
        """Build the candidate into its resident model.

        Args:
            mapping: the configuration (experts' ``source_model`` a reference or a recipe mapping).
            where: names the candidate in messages (``space.yml (trial 7)``).

        Returns:
            The model and the build's result (its ``digest`` identifies the tensors).

        Raises:
            ConfigError / EvomergeError: a bad configuration or expert, a failed merge.
        """
        plain = dict(mapping)
        plain["experts"] = []
        getters: list[ExpertTensors | None] = []
        for i, e in enumerate(mapping.get("experts") or ()):
            e = dict(e)
            src = e.get("source_model")
            if isinstance(src, Mapping):
                getters.append(self._merged_mlp(src, f"{where} (experts[{i}].source_model)"))
                e["source_model"] = merged_label(src)
            else:
                getters.append(None)
            plain["experts"].append(e)
        cfg = parse_moe_config(plain, where)
        refs = [r for r in cfg.referenced_models() if not r.startswith("merged-expert-")]
        open_missing(self.merger.sources, refs, file=where)
        self.builder.check(
            cfg,
            [
                None if g is not None else self.merger.sources[e.source_model]
                for e, g in zip(cfg.experts, getters, strict=True)
            ],
        )
        layout = self.builder.layout(cfg)
        tensors = [
            g if g is not None else self.merger.sources[e.source_model].get
            for e, g in zip(cfg.experts, getters, strict=True)
        ]
        key = json.dumps(layout.config_dict(), sort_keys=True, default=str) + layout.dtype
        model = self._models.get(key)
        if model is None:
            if (
                len(self._models) >= 2
            ):  # searches over experts_per_token or experts change layouts: bound memory
                self._models.clear()
            model = self.builder.build_model(layout)
            self._models[key] = model
        return model, self.builder.build_into(model, cfg, layout, tensors)

    def _merged_mlp(self, recipe: Mapping[str, Any], where: str) -> ExpertTensors:
        """Merge a recipe's MLP tensors (in memory); returns them by name."""
        cfg = parse_recipe(dict(recipe), where)
        plan = self.merger.plan(cfg)
        if plan.out_config.get("model_type") not in ("llama", "mistral"):
            raise ConfigError(
                where,
                "merge_method",
                f"a merged expert must be a Llama or Mistral model, this merge gives {plan.out_config.get('model_type')!r}",
            )
        mlp_plan = dataclasses.replace(plan, tasks=[t for t in plan.tasks if ".mlp." in t.out_name])
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, t: torch.Tensor) -> None:
            out[name] = t.detach().to("cpu", copy=True)

        self.merger.execute(mlp_plan, keep, digest=False)
        return out.__getitem__

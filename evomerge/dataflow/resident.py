"""Data-flow candidates of a search, built in memory beside the merges.

:class:`ResidentPaths` holds every source of a candidate once (a model's tensors as stored, on the
search's device in the model's dtype; a merge recipe source merged once by the search's
:class:`~evomerge.engine.merger.Merger`) and points one model per set of sources at each
candidate's path (:class:`~evomerge.dataflow.model.PathBuilder`). A trial then costs its evaluation:
nothing is copied, and its digest is a hash of the path, not of tensors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.dataflow.candidate import Candidate, parse_candidate, source_identity
from evomerge.dataflow.model import LayerSource, PathBuilder, resolve_dtype
from evomerge.dtypes import torch_dtype
from evomerge.engine.merger import Merger
from evomerge.engine.sources import open_sources
from evomerge.recipe.schema import parse_recipe

__all__ = ["DataflowResult", "ResidentPaths"]


@dataclass(frozen=True)
class DataflowResult:
    """What building a candidate did: its digest (of the path) and the time it took."""

    digest: str
    seconds: float
    steps: int


class ResidentPaths:
    """Builds data-flow candidates over a search's merger (its sources, device and seed).

    Args:
        merger: the search's resident merger.
    """

    def __init__(self, merger: Merger) -> None:
        self.merger = merger
        self._held: dict[tuple[str, str], LayerSource] = {}
        self._builders: dict[tuple[Any, ...], PathBuilder] = {}
        self._configs: dict[str, Mapping[str, Any]] = {}

    def materialize(
        self, mapping: Mapping[str, Any], where: str
    ) -> tuple[torch.nn.Module, DataflowResult]:
        """Point a model at the candidate's path.

        Args:
            mapping: the candidate (``merge_method: dataflow``).
            where: names the candidate in messages (``space.yml (trial 7)``).

        Returns:
            The model and the result (``digest``: the path's).

        Raises:
            ConfigError / EvomergeError: a bad candidate, an unreadable or incompatible source, a
                failed merge of a recipe source.
        """
        t0 = time.perf_counter()
        cand = parse_candidate(mapping, where)
        builder = self.builder(cand, where)
        steps = [
            (s.source, s.layer, c) for s, c in zip(cand.steps, cand.output_scales(), strict=True)
        ]
        with torch.no_grad():
            model = builder.build(steps)
        return model, DataflowResult(cand.digest(), time.perf_counter() - t0, len(steps))

    def builder(self, cand: Candidate, where: str) -> PathBuilder:
        """The builder over the candidate's sources (made once per set of sources and dtype)."""
        idents = tuple((n, source_identity(v)) for n, v in cand.sources.items())
        first_config = self._config(next(iter(cand.sources.values())), where)
        dtype = resolve_dtype(cand.dtype, first_config)
        key = (idents, dtype)
        b = self._builders.get(key)
        if b is None:
            held = {n: self.hold(n, v, dtype, where) for n, v in cand.sources.items()}
            b = PathBuilder(held, self.merger.device, dtype)
            self._builders[key] = b
        return b

    def hold(self, name: str, src: str | Mapping[str, Any], dtype: str, where: str) -> LayerSource:
        """A source's tensors, resident (a recipe merged here, once per study)."""
        key = (source_identity(src), dtype)
        held = self._held.get(key)
        if held is None:
            config, tensors = self._tensors(src, where)
            held = LayerSource.hold(name, config, tensors, self.merger.device, torch_dtype(dtype))
            self._held[key] = held
        return held

    def _config(self, src: str | Mapping[str, Any], where: str) -> Mapping[str, Any]:
        if isinstance(src, str):
            self._open(src, where)
            return self.merger.sources[src].config
        key = source_identity(src)  # a merge source is planned once, not at every trial
        if key not in self._configs:
            self._configs[key] = self.merger.plan(parse_recipe(dict(src), where)).out_config
        return self._configs[key]

    def _open(self, ref: str, where: str) -> None:
        if ref not in self.merger.sources:
            self.merger.sources.update(open_sources([ref], file=where))

    def _tensors(
        self, src: str | Mapping[str, Any], where: str
    ) -> tuple[Mapping[str, Any], dict[str, torch.Tensor]]:
        if isinstance(src, str):
            self._open(src, where)
            ms = self.merger.sources[src]
            return ms.config, {n: ms.get(n) for n in ms.names()}
        plan = self.merger.plan(parse_recipe(dict(src), where))
        out: dict[str, torch.Tensor] = {}

        def keep(name: str, t: torch.Tensor) -> None:
            out[name] = t.detach()

        self.merger.execute(plan, keep, digest=False)
        return plan.out_config, out

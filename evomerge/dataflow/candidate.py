"""A data-flow candidate: a path through the sources' layers, with the input scale of each step.

A candidate is what a data-flow space renders at a point, and what a trial stores as its recipe::

    merge_method: dataflow
    sources: {rot: zoo:demo/rot, ps: {merge_method: task_arithmetic, ...}}   # models or merge recipes
    path: [[rot, 0, 1.0], [ps, 2, 0.8], [ps, 2, 1.3], [rot, 3, 1.0]]       # [source, layer, scale]
    dtype: float32                                                         # optional

Step ``i`` runs layer ``layer`` of source ``source`` on the residual stream times ``scale``
(Sakana's input scale ``s_i``). The embeddings come from the first step's source and the final norm
and head from the last step's, as mergekit's passthrough takes them from the first and last slice.

The model that is built and scored is the same function written as weights: pre-norm blocks read the
stream through RMSNorm, which ignores a positive factor, so scaling the stream entering step ``i``
equals keeping the stream as it is and scaling the outputs of every step from ``i`` on by ``1/s_i``.
Step ``i``'s output projections carry ``c_i = 1 / (s_1 s_2 ... s_i)`` (:meth:`Candidate.output_scales`);
the embedding keeps factor 1, so tied embeddings stay tied. The two forms differ only where RMSNorm's
``eps`` is not small beside the stream's mean square, and the built model *is* the exported one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError

__all__ = [
    "METHOD",
    "Step",
    "Candidate",
    "is_dataflow_mapping",
    "parse_candidate",
    "source_identity",
]

METHOD = "dataflow"  # the candidate's merge_method: the table's method column
_KEYS = ("merge_method", "sources", "path", "dtype")


@dataclass(frozen=True)
class Step:
    """One step of a path: layer ``layer`` of source ``source`` with input scale ``scale`` (> 0)."""

    source: str
    layer: int
    scale: float


@dataclass(frozen=True)
class Candidate:
    """A parsed data-flow candidate (see the module docstring).

    Attributes:
        sources: name -> a model reference or a merge recipe mapping, in the order written.
        steps: the path.
        dtype: the dtype the model runs in (None: the first source's stored dtype).
    """

    sources: Mapping[str, str | Mapping[str, Any]]
    steps: tuple[Step, ...]
    dtype: str | None = None

    def output_scales(self) -> list[float]:
        """``c_i = 1 / (s_1 ... s_i)``: the factor on step ``i``'s output projections.

        Example:
            >>> c = Candidate({"a": "m"}, (Step("a", 0, 2.0), Step("a", 1, 1.0), Step("a", 1, 0.5)))
            >>> c.output_scales()
            [0.5, 0.5, 1.0]
        """
        out, c = [], 1.0
        for s in self.steps:
            c = c / s.scale
            out.append(c)
        return out

    def used_sources(self) -> list[str]:
        """The sources the path visits, in the order they are first met."""
        return list(dict.fromkeys(s.source for s in self.steps))

    def digest(self) -> str:
        """A hash of what the candidate computes: the path, its scales, the sources it reads and
        the dtype (never of tensors: building a candidate copies none). Equal candidates share it,
        whatever their sources are called; it starts ``dfs1-``, so it is never taken for a tensor hash.

        Example:
            >>> a = Candidate({"x": "m"}, (Step("x", 0, 1.0),))
            >>> b = Candidate({"y": "m", "z": "n"}, (Step("y", 0, 1.0),))
            >>> a.digest() == b.digest(), a.digest().startswith("dfs1-")
            (True, True)
        """
        ident = {n: source_identity(self.sources[n]) for n in self.used_sources()}
        body = {
            "path": [[ident[s.source], s.layer, float(s.scale).hex()] for s in self.steps],
            "dtype": self.dtype,
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return "dfs1-" + hashlib.sha256(text.encode()).hexdigest()

    def to_mapping(self) -> dict[str, Any]:
        """The mapping form (what a trial stores)."""
        out: dict[str, Any] = {
            "merge_method": METHOD,
            "sources": {n: _plain(v) for n, v in self.sources.items()},
            "path": [[s.source, s.layer, s.scale] for s in self.steps],
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        return out


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def source_identity(src: str | Mapping[str, Any]) -> str:
    if isinstance(src, str):
        return src
    text = json.dumps(_plain(src), sort_keys=True, separators=(",", ":"), default=str)
    return "recipe:" + hashlib.sha256(text.encode()).hexdigest()


def is_dataflow_mapping(m: Any) -> bool:
    """Whether a recipe mapping is a data-flow candidate (``merge_method: dataflow``)."""
    return isinstance(m, Mapping) and m.get("merge_method") == METHOD


def parse_candidate(m: Mapping[str, Any], where: str | None) -> Candidate:
    """Validate a candidate mapping.

    Args:
        m: the mapping (see the module docstring).
        where: names the file or trial in messages.

    Returns:
        The :class:`Candidate`.

    Raises:
        ConfigError: an unknown key, no sources, an empty path, a step naming no source, a layer
            that is not a whole number >= 0, or a scale that is not a positive finite number.
    """
    for k in m:
        if k not in _KEYS:
            raise ConfigError(
                where, str(k), f"unknown key of a dataflow candidate (allowed: {', '.join(_KEYS)})"
            )
    sources = m.get("sources")
    if not isinstance(sources, Mapping) or not sources:
        raise ConfigError(
            where, "sources", "must map source names to model references or merge recipes"
        )
    for name, v in sources.items():
        if not (isinstance(v, str) and v) and not isinstance(v, Mapping):
            raise ConfigError(
                where,
                f"sources.{name}",
                f"must be a model reference or a recipe mapping, got {v!r}",
            )
    path = m.get("path")
    if not isinstance(path, list) or not path:
        raise ConfigError(
            where, "path", "has no layers: a path needs at least one [source, layer, scale] step"
        )
    steps = []
    for i, st in enumerate(path):
        fld = f"path[{i}]"
        if not isinstance(st, (list, tuple)) or len(st) != 3:
            raise ConfigError(where, fld, f"must be [source, layer, scale], got {st!r}")
        name, layer, scale = st
        if name not in sources:
            raise ConfigError(
                where, fld, f"source {name!r} is not in sources ({', '.join(map(str, sources))})"
            )
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(where, fld, f"the layer must be a whole number >= 0, got {layer!r}")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ConfigError(
                where,
                fld,
                f"the scale must be a number above 0 (the export folds 1/scale into weights), got {scale!r}",
            )
        steps.append(Step(str(name), layer, float(scale)))
    dtype = m.get("dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise ConfigError(where, "dtype", f"must be a dtype name such as float32, got {dtype!r}")
    return Candidate(dict(sources), tuple(steps), dtype)

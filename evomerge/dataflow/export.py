"""A data-flow candidate as a mergekit ``passthrough`` recipe with ``slices:``, and the check that a
model built from it holds the tensors the trial computed with.

Each run of steps that reads consecutive layers of one source with one output scale becomes a slice;
a scale ``c != 1`` becomes the slice's ``scale`` parameter, filtered to the output projections::

    merge_method: passthrough
    slices:
      - sources: [{model: /zoo/demo/rot, layer_range: [0, 2]}]
      - sources: [{model: /zoo/demo/sort, layer_range: [2, 3]}]
        parameters:
          scale: [{filter: self_attn.o_proj, value: 0.8}, {filter: mlp.down_proj, value: 0.8}]
    dtype: float32

mergekit and ``evomerge merge`` both take the embeddings from the first slice's model and the final
norm and head from the last slice's, as the candidate's model does, and multiply a tensor by ``scale``
in the recipe's dtype: with ``dtype: float32`` the built tensors are exactly ``c * W`` in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge.dataflow.candidate import Candidate
from evomerge.dataflow.model import WRITERS
from evomerge.engine.arch import is_pre_tensor
from evomerge.engine.sources import ModelSource
from evomerge.errors import EvomergeError

__all__ = ["passthrough_recipe", "slices_of", "compare_built"]

_DEFAULT_WRITERS = WRITERS["llama"]


def slices_of(cand: Candidate) -> list[tuple[str, int, int, float]]:
    """``(source, first layer, end layer, output scale)`` per slice: runs of consecutive layers of
    one source with one scale.

    Example:
        >>> from evomerge.dataflow.candidate import Step
        >>> c = Candidate({"a": "m"}, (Step("a", 0, 1.0), Step("a", 1, 1.0), Step("a", 1, 2.0)))
        >>> slices_of(c)
        [('a', 0, 2, 1.0), ('a', 1, 2, 0.5)]
    """
    out: list[tuple[str, int, int, float]] = []
    for s, c in zip(cand.steps, cand.output_scales(), strict=True):
        if out and out[-1][0] == s.source and out[-1][2] == s.layer and out[-1][3] == c:
            name, lo, _, _ = out[-1]
            out[-1] = (name, lo, s.layer + 1, c)
        else:
            out.append((s.source, s.layer, s.layer + 1, c))
    return out


def passthrough_recipe(
    cand: Candidate, refs: Mapping[str, str], dtype: str, writers: Sequence[str] = _DEFAULT_WRITERS
) -> dict[str, Any]:
    """The mergekit recipe of a candidate.

    Args:
        cand: the candidate.
        refs: source name -> the model reference the recipe names (a directory, a hub id); a merged
            source names the directory its own recipe is merged into.
        dtype: the recipe's dtype (the model's: the scales are applied in it).
        writers: the modules whose weights carry each step's output scale.

    Returns:
        The recipe mapping (``merge_method: passthrough``, ``slices``, ``dtype``).
    """
    slices = []
    for name, lo, hi, c in slices_of(cand):
        sl: dict[str, Any] = {"sources": [{"model": refs[name], "layer_range": [lo, hi]}]}
        if c != 1.0:
            sl["parameters"] = {"scale": [{"filter": w, "value": c} for w in writers]}
        slices.append(sl)
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}


def _expected(
    cand: Candidate, sources: Mapping[str, ModelSource], name: str, writers: Sequence[str]
) -> torch.Tensor:
    """The tensor ``name`` of the candidate's model, as the export's recipe computes it (float32)."""
    first, last = sources[cand.steps[0].source], sources[cand.steps[-1].source]
    split = first.arch.split(name)
    if split is None:
        src = first if is_pre_tensor(name) else last
        if name not in src and name.endswith("lm_head.weight"):  # a tied checkpoint: the embedding
            name = next(
                k for k in src.names() if is_pre_tensor(k) and k.endswith("embed_tokens.weight")
            )
        return src.get(name).to(torch.float32)
    k, suffix = split
    step = cand.steps[k]
    src = sources[step.source]
    t = src.get(src.arch.layer_name(step.layer, suffix)).to(torch.float32)
    c = cand.output_scales()[k]
    if c != 1.0 and any(suffix.startswith(w + ".") for w in writers):
        t = t * c
    return t


def compare_built(
    cand: Candidate, model_dirs: Mapping[str, Path], built: Path
) -> tuple[int, float]:
    """Compare a model built from the export with the tensors the candidate's model computes with.

    Args:
        cand: the candidate.
        model_dirs: source name -> its model directory (a merged source: where it was merged).
        built: the built model's directory.

    Returns:
        ``(tensors compared, largest absolute difference)``: 0.0 when every tensor is the same.

    Raises:
        EvomergeError: the built model has another number of layers, or a tensor of another shape.
    """
    used = cand.used_sources()
    sources = {n: ModelSource(n, Path(model_dirs[n])) for n in used}
    out = ModelSource(str(built), built)
    if out.arch.num_layers != len(cand.steps):
        raise EvomergeError(
            f"{built}: has {out.arch.num_layers} layers, the path has {len(cand.steps)} steps"
        )
    writers = WRITERS.get(str(out.config.get("model_type")), _DEFAULT_WRITERS)
    worst = 0.0
    names = list(out.names())
    for n in names:
        got = out.get(n)
        want = _expected(cand, sources, n, writers).to(got.dtype)
        if tuple(got.shape) != tuple(want.shape):
            raise EvomergeError(
                f"{built}: tensor {n} is {list(got.shape)}, the path gives {list(want.shape)}"
            )
        if got.numel():
            worst = max(worst, float((got.float() - want.float()).abs().max()))
    return len(names), worst

"""The in-process tensor merge engine (mergekit-compatible recipes).

Sources (:mod:`.sources`) are opened lazily from model references; a plan (:mod:`.plan`) says, for
every output tensor, which input tensors and parameters make it; the merger (:mod:`.merger`) runs
the method kernels (:mod:`.kernels`) and writes into a resident model or streams to disk
(:mod:`.writer`, :mod:`.card`).
"""

from evomerge.engine.merger import (
    Merger,
    MergeResult,
    digest_model_dir,
    merge_in_memory,
    merge_to_disk,
    tensors_digest,
)
from evomerge.engine.plan import MergePlan, TensorTask, make_plan
from evomerge.engine.sources import ModelSource, open_sources, resolve_model
from evomerge.methods import METHODS, Method, Param, get_method

__all__ = [
    "Merger",
    "MergeResult",
    "MergePlan",
    "TensorTask",
    "METHODS",
    "Method",
    "Param",
    "ModelSource",
    "digest_model_dir",
    "get_method",
    "make_plan",
    "merge_in_memory",
    "merge_to_disk",
    "open_sources",
    "resolve_model",
    "tensors_digest",
]

"""The in-process tensor merge engine (mergekit-compatible recipes)."""

from evomerge.engine.merge import Merger, MergeResult, digest_model_dir, merge_in_memory, merge_to_disk, tensors_digest
from evomerge.engine.methods import METHODS, Method, Param, get_method
from evomerge.engine.plan import MergePlan, TensorTask, make_plan
from evomerge.engine.sources import ModelSource, open_sources, resolve_model

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

"""The in-process tensor merge engine (mergekit-compatible recipes).

Names are imported lazily (PEP 562) so that :mod:`evomerge.config`, which needs only
:mod:`evomerge.engine.methods`, can be imported first without a circular import.
"""

from __future__ import annotations

import importlib
from typing import Any

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

_WHERE = {
    "Merger": "merge",
    "MergeResult": "merge",
    "digest_model_dir": "merge",
    "merge_in_memory": "merge",
    "merge_to_disk": "merge",
    "tensors_digest": "merge",
    "METHODS": "methods",
    "Method": "methods",
    "Param": "methods",
    "get_method": "methods",
    "MergePlan": "plan",
    "TensorTask": "plan",
    "make_plan": "plan",
    "ModelSource": "sources",
    "open_sources": "sources",
    "resolve_model": "sources",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"evomerge.engine.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evomerge.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

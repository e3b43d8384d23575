"""Merge methods as data: their declarations (:mod:`.spec`), one registry (:mod:`.registry`) and
reference formulas (:mod:`.reference`). No kernel is imported here: the engine picks kernels by name."""

from evomerge.methods.reference import sign_consensus, slerp_tensors
from evomerge.methods.registry import METHODS, NOT_METHODS, get_method
from evomerge.methods.spec import REQUIRED, Method, Param

__all__ = [
    "METHODS",
    "NOT_METHODS",
    "REQUIRED",
    "Method",
    "Param",
    "get_method",
    "sign_consensus",
    "slerp_tensors",
]

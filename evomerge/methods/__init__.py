"""Merge methods as data: their declarations (:mod:`.spec`) and one registry (:mod:`.registry`).
No kernel is imported here: the engine picks kernels by the method's name and data."""

from evomerge.methods.registry import METHODS, NOT_METHODS, get_method
from evomerge.methods.spec import REQUIRED, Method, Param, Sparsifier

__all__ = ["METHODS", "NOT_METHODS", "REQUIRED", "Method", "Param", "Sparsifier", "get_method"]

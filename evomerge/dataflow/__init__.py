"""Data-flow search: a candidate is a path through the sources' layers, each step's input scaled.

:mod:`.candidate` (the path, its output scales and digest), :mod:`.model` (the candidate's model over
resident source tensors, nothing copied), :mod:`.resident` (candidates of a search, beside merges),
:mod:`.export` (a mergekit passthrough recipe with the scales folded into weights), :mod:`.section`
(the ``dataflow:`` section of a space).
"""

from evomerge.dataflow.candidate import (
    METHOD,
    Candidate,
    Step,
    is_dataflow_mapping,
    parse_candidate,
)
from evomerge.dataflow.export import compare_built, passthrough_recipe
from evomerge.dataflow.resident import DataflowResult, ResidentPaths

__all__ = [
    "METHOD",
    "Candidate",
    "Step",
    "DataflowResult",
    "ResidentPaths",
    "compare_built",
    "is_dataflow_mapping",
    "parse_candidate",
    "passthrough_recipe",
]

"""evomerge: search merge recipes for fine-tuned LLMs.

A declarative search space (a mergekit recipe with free values) is explored by an Optuna study;
each candidate is merged in memory and scored with lm-evaluation-harness on search items, finalists
on disjoint holdout items; results carry contamination flags; the best recipe exports as plain
mergekit YAML.
"""

__version__ = "0.1.0"

# The engine and the recipe schema import each other; loading the engine package first fixes the
# order whichever module a caller imports first.
import evomerge.engine  # noqa: E402,F401

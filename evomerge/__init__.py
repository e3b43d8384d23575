"""evomerge: search merge recipes for fine-tuned LLMs.

A declarative search space (a mergekit recipe with free values) is explored by an Optuna study;
each candidate is merged in memory and scored with lm-evaluation-harness on search items, finalists
on disjoint holdout items; results carry contamination flags; the best recipe exports as plain
mergekit YAML.
"""

__version__ = "0.2.0"

"""Contamination and overfitting flags, measured and shown next to every score.

Modules, each one concept:

* :mod:`.lineage`: merge lineage of a source model (cards, tags, mergekit configs, parents, recursively).
* :mod:`.taskdata`: which datasets the evaluation tasks read; eval data in a lineage's declared training data.
* :mod:`.rules`: the flag rules (public benchmark, overfit) and the :class:`Assessment` of one study.
* :mod:`.render`: flag letters, legend, and the markdown "Contamination and evaluation" section.
* :mod:`.probe`: the opt-in Min-K%++ memorization probe.

Import the public names from here: ``from evomerge.contamination import assess, flag_marks``.
"""

from evomerge.contamination.lineage import (
    MERGE_TAGS,
    Card,
    Lineage,
    Resolver,
    default_resolve,
    model_lineage,
    read_card,
)
from evomerge.contamination.probe import (
    ProbeResult,
    min_k_plus_plus,
    perturb_texts,
    probe_contamination,
    task_texts,
)
from evomerge.contamination.render import (
    as_comments,
    flag_marks,
    flag_raised,
    legend,
    render_contamination_section,
)
from evomerge.contamination.rules import (
    FLAG_COLUMNS,
    PUBLIC_BENCHMARKS,
    Assessment,
    OverfitResult,
    assess,
    assessment_from_dict,
    assessment_to_dict,
    overfit,
    overfit_columns,
    public_benchmark_tasks,
    source_flags,
)
from evomerge.contamination.taskdata import (
    DatasetHit,
    dataset_hits,
    eval_data_in_training,
    norm_dataset,
    task_datasets,
)

__all__ = [
    # lineage
    "MERGE_TAGS",
    "Card",
    "Lineage",
    "Resolver",
    "read_card",
    "default_resolve",
    "model_lineage",
    # task data
    "DatasetHit",
    "task_datasets",
    "norm_dataset",
    "dataset_hits",
    "eval_data_in_training",
    # rules
    "FLAG_COLUMNS",
    "PUBLIC_BENCHMARKS",
    "public_benchmark_tasks",
    "OverfitResult",
    "overfit",
    "overfit_columns",
    "Assessment",
    "assess",
    "source_flags",
    "assessment_to_dict",
    "assessment_from_dict",
    # display
    "flag_raised",
    "flag_marks",
    "legend",
    "render_contamination_section",
    "as_comments",
    # memorization probe
    "ProbeResult",
    "min_k_plus_plus",
    "perturb_texts",
    "probe_contamination",
    "task_texts",
]

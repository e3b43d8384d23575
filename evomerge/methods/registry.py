"""The registry of merge methods: one explicit dict, nothing registered by import side effects.

The task-vector family is one generalized method: each entry says, by keyword, how it sparsifies
each task vector, whether TIES sign consensus elects the entries that take part, and which of
``normalize`` and ``rescale`` are on by default (mergekit 0.1.5's generalized task arithmetic).

Example:
    >>> METHODS["ties"].sparsifier.value, METHODS["ties"].consensus
    ('magnitude', True)
    >>> [p.name for p in get_method("slerp").params]
    ['t']
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from evomerge.methods.spec import Method, Param, Sparsifier

__all__ = ["METHODS", "NOT_METHODS", "KNOWN_PARAMS", "get_method"]


def _fraction(name: str, default: float, help: str, **bound: bool) -> Param:
    """A fraction of each task vector (in [0, 1], ``bound`` opening either end)."""
    return Param(name, float, "non_base", default, low=0.0, high=1.0, help=help, **bound)


_DENSITY = _fraction("density", 1.0, "fraction of each task vector kept", low_open=True)
_WEIGHT = Param("weight", float, "non_base", help="scale of each task vector")
# ram's threshold: a task-vector entry counts as changed where |delta| > epsilon.
_RAM_EPSILON = Param(
    "epsilon",
    float,
    "shared",
    1e-5,
    low=0.0,
    help="entries with |delta| at most this count as unchanged",
)
_TV_SHARED = (
    Param(
        "normalize", bool, "shared", False, help="divide by the sum of the weights that took part"
    ),
    Param("rescale", bool, "shared", False, help="rescale kept entries to the original L1 norm"),
    Param(
        "int8_mask", bool, "shared", False, help="accepted for mergekit compatibility (memory only)"
    ),
    Param("lambda", float, "shared", 1.0, help="scale of the merged task vector"),
)
# What a sparsifier takes beyond the density.
_SPARSIFIER_PARAMS = {
    Sparsifier.MAGNITUDE_OUTLIERS: _fraction(
        "gamma", 0.01, "fraction of largest entries dropped", high_open=True
    ),
    Sparsifier.DELLA: _fraction(
        "epsilon", 0.15, "spread of keep probabilities around density", high_open=True
    ),
}


def _task_vector(
    name: str,
    sparsifier: Sparsifier | None = None,
    *,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    reference: str,
) -> Method:
    defaults = {"normalize": normalize, "rescale": rescale}
    shared = tuple(replace(p, default=defaults.get(p.name, p.default)) for p in _TV_SHARED)
    extra = (_SPARSIFIER_PARAMS[sparsifier],) if sparsifier in _SPARSIFIER_PARAMS else ()
    return Method(
        name,
        shared + (_WEIGHT, _DENSITY) + extra,
        base="required",
        sparsifier=sparsifier,
        consensus=consensus,
        reference=reference,
    )


# A method of a base and one other model.
_pair = partial(Method, base="required", min_inputs=2, max_inputs=2)

_TIES, _DARE = "https://arxiv.org/abs/2306.01708", "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS, _DELLA = "https://arxiv.org/abs/2312.06795", "https://arxiv.org/abs/2406.11617"
_RAM = "https://arxiv.org/abs/2601.13572"

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
            reference="https://arxiv.org/abs/2203.05482",
        ),
        _pair(
            "slerp", (Param("t", float, "shared"),), reference="https://en.wikipedia.org/wiki/Slerp"
        ),
        _task_vector("task_arithmetic", reference="https://arxiv.org/abs/2212.04089"),
        _task_vector("ties", Sparsifier.MAGNITUDE, consensus=True, normalize=True, reference=_TIES),
        _task_vector("dare_ties", Sparsifier.RANDOM, consensus=True, rescale=True, reference=_DARE),
        _task_vector("dare_linear", Sparsifier.RANDOM, rescale=True, reference=_DARE),
        _task_vector("breadcrumbs", Sparsifier.MAGNITUDE_OUTLIERS, reference=_BREADCRUMBS),
        _task_vector(
            "breadcrumbs_ties",
            Sparsifier.MAGNITUDE_OUTLIERS,
            consensus=True,
            reference=_BREADCRUMBS,
        ),
        _task_vector(
            "della",
            Sparsifier.DELLA,
            consensus=True,
            normalize=True,
            rescale=True,
            reference=_DELLA,
        ),
        _task_vector("della_linear", Sparsifier.DELLA, rescale=True, reference=_DELLA),
        Method(
            "model_stock",
            (Param("filter_wise", bool, "shared", False),),
            base="required",
            min_inputs=3,
            reference="https://arxiv.org/abs/2403.19522",
        ),
        Method(
            "nuslerp",
            (
                Param("weight", float, "non_base"),
                Param("nuslerp_row_wise", bool, "shared", False),
                Param("nuslerp_flatten", bool, "shared", True),
            ),
            base="optional",
            min_non_base=2,
            max_non_base=2,
        ),
        Method(
            "multislerp",
            (
                Param("weight", float, "non_base"),
                Param("normalize_weights", bool, "shared", True),
                Param("eps", float, "shared", 1e-8, low=0.0, low_open=True),
            ),
            base="optional",
            min_non_base=1,
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        ),
        Method(
            "karcher",
            (
                Param("max_iter", int, "shared", 10, low=1),
                Param("tol", float, "shared", 1e-5, low=0.0, low_open=True),
            ),
        ),
        Method(
            "sce",
            (
                Param("int8_mask", bool, "shared", False),
                Param("select_topk", float, "shared", 1.0, low=0.0, high=1.0, low_open=True),
            ),
            base="required",
            reference="https://arxiv.org/abs/2408.07990",
        ),
        Method("passthrough", (Param("scale", float, "input", None, optional=True),), max_inputs=1),
        _pair(
            "nearswap",
            (
                Param(
                    "t",
                    float,
                    "shared",
                    low=0.0,
                    help="distance below which the base takes the other model's value",
                ),
            ),
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        ),
        _pair("arcee_fusion", (), reference="https://arcee.ai"),
        Method("ram", (_RAM_EPSILON,), base="required", reference=_RAM),
        Method(
            "ramplus_tl",
            (
                Param(
                    "r",
                    float,
                    "shared",
                    0.1,
                    help="how much the unique entries of a task vector are boosted",
                ),
                Param(
                    "alpha",
                    float,
                    "shared",
                    0.2,
                    low=0.0,
                    help="cap on the shared-to-unique ratio that sets the boost",
                ),
                replace(_RAM_EPSILON, low_open=True),
            ),
            base="required",
            reference=_RAM,
        ),
    )
}

# Every parameter name some method takes. mergekit 0.1.5's methods are all in METHODS, so this is
# also the set of names mergekit knows: a recipe may carry one its method does not use (a model's
# weight kept when merge_method is switched to slerp), which mergekit ignores.
KNOWN_PARAMS: frozenset[str] = frozenset(p.name for m in METHODS.values() for p in m.params)

# Names that exist elsewhere but are not merge methods of this tool, with the reason.
NOT_METHODS = {
    "moe": "`moe` builds a mixture of experts (a mergekit-moe configuration): build it with `evomerge moe` instead of `evomerge merge`",
}


def get_method(name: str) -> Method:
    """Look up a method by name.

    Raises:
        KeyError: ``name`` is not a method (callers turn it into a ConfigError naming close matches).
    """
    return METHODS[name]

"""The registry of merge methods: one explicit dict, nothing registered by import side effects.

Example:
    >>> METHODS["ties"].sparsifier, METHODS["ties"].consensus
    ('magnitude', True)
    >>> [p.name for p in get_method("slerp").params]
    ['t']
"""

from __future__ import annotations

from evomerge.methods.spec import Method, Param

__all__ = ["METHODS", "NOT_METHODS", "KNOWN_PARAMS", "get_method"]

_DENSITY = Param(
    "density",
    float,
    "non_base",
    1.0,
    low=0.0,
    high=1.0,
    low_open=True,
    help="fraction of each task vector kept",
)
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


def _task_vector_method(
    name: str,
    sparsifier: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    reference: str,
) -> Method:
    shared = tuple(
        Param(
            p.name,
            p.kind,
            p.scope,
            {"normalize": normalize, "rescale": rescale}.get(p.name, p.default),
            help=p.help,
        )
        for p in _TV_SHARED
    )
    extra: tuple[Param, ...] = ()
    if sparsifier == "magnitude_outliers":
        extra = (
            Param(
                "gamma",
                float,
                "non_base",
                0.01,
                low=0.0,
                high=1.0,
                high_open=True,
                help="fraction of largest entries dropped",
            ),
        )
    elif sparsifier == "della":
        extra = (
            Param(
                "epsilon",
                float,
                "non_base",
                0.15,
                low=0.0,
                high=1.0,
                high_open=True,
                help="spread of keep probabilities around density",
            ),
        )
    return Method(
        name=name,
        params=shared + (_WEIGHT, _DENSITY) + extra,
        base="required",
        sparsifier=sparsifier,
        consensus=consensus,
        reference=reference,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
            reference="https://arxiv.org/abs/2203.05482",
        ),
        Method(
            "slerp",
            (Param("t", float, "shared"),),
            base="required",
            min_inputs=2,
            max_inputs=2,
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
        _task_vector_method(
            "task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"
        ),
        _task_vector_method(
            "ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"
        ),
        _task_vector_method(
            "dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"
        ),
        _task_vector_method(
            "dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"
        ),
        _task_vector_method(
            "breadcrumbs",
            "magnitude_outliers",
            False,
            False,
            False,
            "https://arxiv.org/abs/2312.06795",
        ),
        _task_vector_method(
            "breadcrumbs_ties",
            "magnitude_outliers",
            True,
            False,
            False,
            "https://arxiv.org/abs/2312.06795",
        ),
        _task_vector_method("della", "della", True, True, True, "https://arxiv.org/abs/2406.11617"),
        _task_vector_method(
            "della_linear", "della", False, False, True, "https://arxiv.org/abs/2406.11617"
        ),
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
        Method(
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
            base="required",
            min_inputs=2,
            max_inputs=2,
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        ),
        Method(
            "arcee_fusion",
            (),
            base="required",
            min_inputs=2,
            max_inputs=2,
            reference="https://arcee.ai",
        ),
        Method(
            "ram", (_RAM_EPSILON,), base="required", reference="https://arxiv.org/abs/2601.13572"
        ),
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
                Param(
                    "epsilon", float, "shared", 1e-5, low=0.0, low_open=True, help=_RAM_EPSILON.help
                ),
            ),
            base="required",
            reference="https://arxiv.org/abs/2601.13572",
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
        KeyError: with a message naming close matches (callers turn it into a ConfigError).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(name) from None

"""Optuna samplers by name, and the bridge from a space's directives to ``trial.suggest_*``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from evomerge.space import Directive

__all__ = ["make_sampler", "suggester"]


def make_sampler(name: str, seed: int, n_trials: int, startup: int | None = None, multi: bool = False) -> Any:
    """The Optuna sampler for ``search.sampler``, seeded.

    Args:
        name: tpe, random, cmaes, gp or nsga2 (validated when the space is parsed).
        seed: the search seed.
        n_trials: the trial budget (sizes the startup phase and NSGA-II's population).
        startup: random trials before the model-based sampler takes over (default: a quarter of
            the budget, 4 to 10).
        multi: several objectives.

    The default (``search.sampler`` unset) is measured (``bench/bench_samplers.py``): ``tpe`` while
    pruning is on (the default) or with several objectives, ``gp`` with ``prune: false``. Without
    pruning gp found the best holdout score on the per-layer demo space and tied random search on the
    demo, over 5 seeds at 24 trials; but Optuna's GPSampler learns from COMPLETE trials only (its
    startup counts them too), so with pruning it stayed at random search, while TPE models pruned
    trials by their partial scores and beat random search. Parameters present in only some trials
    (a TIES density when the method is a choice) are sampled at random by gp and cmaes. gp costs
    about 1.5 s per trial on one busy CPU core at up to 24 trials.

    TPE runs with ``constant_liar``: trials other workers are running count as bad ones at their
    points, so that workers sampling at the same time spread out (alone, there are none); Optuna's
    GPSampler accounts for running trials on its own (q-batch expected improvement).
    """
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if startup is None:
        startup = max(4, min(10, n_trials // 4))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=min(startup, 5), warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, n_trials // 4)))
    raise ValueError(f"unknown sampler {name!r}")  # pragma: no cover - validated when the space is parsed


def suggester(trial: Any) -> Callable[[str, Directive], Any]:
    """``(name, directive) -> value`` drawing from ``trial`` (what :meth:`Space.render` takes)."""

    def suggest(name: str, d: Directive) -> Any:
        if d.kind == "choice":
            return trial.suggest_categorical(name, list(d.choices))
        if d.kind == "int":
            return trial.suggest_int(name, int(d.low), int(d.high), step=int(d.step or 1))
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)

    return suggest

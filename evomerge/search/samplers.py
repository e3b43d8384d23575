"""Optuna samplers by name, and the bridge from a space's directives to ``trial.suggest_*``."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.search.pruning import StoppedAsEstimated
from evomerge.space import Directive

__all__ = ["make_sampler", "suggester", "SeededPerTrial", "trial_seed"]


def make_sampler(
    name: str,
    seed: int,
    n_trials: int,
    startup: int | None = None,
    multi: bool = False,
    *,
    stopped_as_estimated: bool = False,
) -> Any:
    """The Optuna sampler for ``search.sampler``, seeded.

    Args:
        name: tpe, random, cmaes, gp or nsga2 (validated when the space is parsed).
        seed: the search seed.
        n_trials: the trial budget (sizes the startup phase and NSGA-II's population).
        startup: random trials before the model-based sampler takes over (default: a quarter of
            the budget, 4 to 10).
        multi: several objectives.
        stopped_as_estimated: pruning is on: the model-based samplers (tpe, gp, cmaes) see each
            stopped trial as finished at the estimate of its full score (:class:`StoppedAsEstimated`).

    The default (``search.sampler`` unset) is ``tpe`` while pruning is on (the default) or with
    several objectives, and ``gp`` with ``prune: false``; the benchmark pages give the
    measurements behind it. Parameters present in only some trials (a TIES density when the
    method is a choice) are sampled at random by gp and cmaes.

    TPE runs with ``constant_liar``: trials other workers are running count as bad ones at their
    points, so that workers sampling at the same time spread out (alone, there are none); Optuna's
    GPSampler accounts for running trials on its own (q-batch expected improvement).
    """
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if startup is None:
        startup = max(4, min(10, n_trials // 4))

    def seeded(trial_seed: int) -> optuna.samplers.BaseSampler:
        inner = _sampler(name, trial_seed, n_trials, startup)
        if stopped_as_estimated and name in ("tpe", "gp", "cmaes"):
            return StoppedAsEstimated(inner)
        return inner

    return SeededPerTrial(seeded, seed)


def _sampler(name: str, seed: int, n_trials: int, startup: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=min(startup, 5), warn_independent_sampling=False
        )
    if name == "gp":
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=startup, warn_independent_sampling=False
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(4, min(20, n_trials // 4))
        )
    raise ValueError(
        f"unknown sampler {name!r}"
    )  # pragma: no cover - validated when the space is parsed


def trial_seed(seed: int, number: int) -> int:
    """The seed of the sampler that proposes trial ``number`` of a study searched with ``seed``.

    Example:
        >>> trial_seed(0, 3) == trial_seed(0, 3) != trial_seed(0, 4)
        True
    """
    digest = hashlib.sha256(f"evomerge-sampler:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SeededPerTrial(optuna.samplers.BaseSampler):
    """Proposes each trial with a sampler of its own, seeded by the search seed and the trial's
    number (:func:`trial_seed`).

    A proposal is then a function of the seed, the trial's number and the trials before it, never
    of how many proposals this process made before: a study resumed after an interruption goes on
    where it stopped (a sampler seeded once would draw its first points again, and those take the
    scores of the trials that already have them), and workers sharing a study draw different
    points without seeds of their own. Optuna's samplers keep their state in the study (CMA-ES's
    optimizer, NSGA-II's generations), so a fresh one per trial loses nothing.

    Args:
        make: builds the sampler for one trial from its seed.
        seed: the search seed.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self.make, self.seed = make, seed
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _of(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        sampler = self._samplers.get(trial.number)
        if sampler is None:
            if len(self._samplers) > 16:  # trials told elsewhere (another worker's) leave none
                self._samplers.clear()
            sampler = self._samplers[trial.number] = self.make(trial_seed(self.seed, trial.number))
        return sampler

    def infer_relative_search_space(self, study: Any, trial: FrozenTrial) -> dict[str, Any]:
        return self._of(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Any, trial: FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._of(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Any, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Any, trial: FrozenTrial) -> None:
        self._of(trial).before_trial(study, trial)

    def after_trial(self, study: Any, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._of(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:  # seeds come from the trial numbers
        pass


def suggester(trial: Any) -> Callable[[str, Directive], Any]:
    """``(name, directive) -> value`` drawing from ``trial`` (what :meth:`Space.render` takes)."""

    def suggest(name: str, d: Directive) -> Any:
        if d.kind == "choice":
            return trial.suggest_categorical(name, list(d.choices))
        if d.kind == "int":
            return trial.suggest_int(name, int(d.low), int(d.high), step=int(d.step or 1))
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)

    return suggest

"""Optuna samplers by name, and the bridge from a space's directives to ``trial.suggest_*``."""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Callable, Container
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.compat import study_trials
from evomerge.search.records import StudyRecords
from evomerge.space import Directive

__all__ = ["make_sampler", "suggester", "SeededPerTrial", "StoppedAsEstimated", "trial_seed"]


def make_sampler(
    name: str,
    seed: int,
    n_trials: int,
    startup: int | None = None,
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
    # validated when the space is parsed
    raise ValueError(f"unknown sampler {name!r}")  # pragma: no cover


def trial_seed(seed: int, number: int) -> int:
    """The seed of the sampler that proposes trial ``number`` of a study searched with ``seed``.

    Example:
        >>> trial_seed(0, 3) == trial_seed(0, 3) != trial_seed(0, 4)
        True
    """
    digest = hashlib.sha256(f"evomerge-sampler:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class _Forwarding(optuna.samplers.BaseSampler):
    """A sampler that hands each call to the sampler of the trial (:meth:`_for`), showing it the
    study as :meth:`_view` does."""

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _view(self, study: Any) -> Any:
        return study

    def infer_relative_search_space(self, study: Any, trial: FrozenTrial) -> dict[str, Any]:
        return self._for(trial).infer_relative_search_space(self._view(study), trial)

    def sample_relative(
        self, study: Any, trial: FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(self._view(study), trial, search_space)

    def sample_independent(
        self, study: Any, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._for(trial).sample_independent(
            self._view(study), trial, param_name, param_distribution
        )

    def before_trial(self, study: Any, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(self._view(study), trial)

    def after_trial(self, study: Any, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._for(trial).after_trial(self._view(study), trial, state, values)


class SeededPerTrial(_Forwarding):
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

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        sampler = self._samplers.get(trial.number)
        if sampler is None:
            if len(self._samplers) > 16:  # trials told elsewhere (another worker's) leave none
                self._samplers.clear()
            sampler = self._samplers[trial.number] = self.make(trial_seed(self.seed, trial.number))
        return sampler

    def after_trial(self, study: Any, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        super().after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)


class _EstimatedView:
    """``study`` as a sampler sees it under :class:`StoppedAsEstimated`: its trials, each stopped
    one that has an estimate shown as COMPLETE at that value; everything else is the study's."""

    def __init__(self, study: Any) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(  # compat.SAMPLER_TRIALS: what Optuna's samplers call
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        out = []
        for t in study_trials(self._study, deepcopy=deepcopy, use_cache=use_cache):
            est = StudyRecords.estimate_of(t) if t.state == TrialState.PRUNED else None
            if est is not None:
                t = copy.copy(t)
                t.state, t.values = TrialState.COMPLETE, [est]
            if states is None or t.state in states:
                out.append(t)
        return out

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class StoppedAsEstimated(_Forwarding):
    """A sampler that models a trial stopped early (PRUNED, see :mod:`evomerge.search.pruning`) as
    finished at the estimate of its full search score, where Optuna's samplers rank it below every
    finished trial (TPE) or leave it out (gp, cmaes). With pruning, the trials stopped just short of
    the best are the points closest to it; ranked last, they would drop out of TPE's good group.

    Args:
        inner: the sampler that proposes the points; it sees the study through the view above.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        return self.inner

    # The view stands in for the Study samplers are typed to take.
    def _view(self, study: Any) -> Any:
        return _EstimatedView(study)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def suggester(trial: Any) -> Callable[[str, Directive], Any]:
    """``(name, directive) -> value`` drawing from ``trial`` (what :meth:`Space.render` takes)."""

    def suggest(name: str, d: Directive) -> Any:
        if d.kind == "choice":
            return trial.suggest_categorical(name, list(d.choices))
        if d.kind == "int":
            return trial.suggest_int(name, int(d.low), int(d.high), step=int(d.step or 1))
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)

    return suggest

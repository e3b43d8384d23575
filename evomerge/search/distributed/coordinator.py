"""What one worker of a study does with the others: the :class:`Coordinator` the search loop
(:mod:`evomerge.search.loop`) calls for it, and nowhere else.

- :class:`SharedCoordinator` (the default) works for any number of processes on one storage, on
  one host or many: claims (:mod:`.claims`), heartbeats (:mod:`.liveness`) and recovery of dead
  workers' trials (:mod:`.recovery`). A single process pays a few storage writes per trial.
- :class:`Coordinator` itself is for a study no other process can see (an in-memory storage): it
  runs each task at once, keeps no heartbeat and has nothing to recover.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.search.distributed.claims import Claim, Claims
from evomerge.search.distributed.liveness import Liveness
from evomerge.search.distributed.recovery import recover_dead_trials, trial_pulse
from evomerge.search.records import StudyRecords

__all__ = ["Coordinator", "SharedCoordinator", "coordinator_for"]


class Coordinator:
    """The several-worker side of a search, as the loop sees it; this class itself is the
    coordinator of a study no other process sees (every task runs at once, nothing to keep alive
    or recover).

    The contract: :meth:`join` before anything else and :meth:`leave` at the end (also after an
    error); :meth:`once` runs ``work`` in exactly one worker of the study unless ``done()`` (and,
    with ``wait``, returns only once it is done); :meth:`running` wraps a trial from its claim to
    its tell; :meth:`recover` and :meth:`busy` may be called before any trial, :meth:`surplus` once a trial
    is asked and claimed.
    """

    def __init__(self, liveness: Liveness | None = None) -> None:
        self.liveness = liveness or Liveness()

    def join(self) -> int:
        """Take a worker slot; returns this worker's number among the live ones (0 alone)."""
        return 0

    def leave(self) -> list[str]:
        """Give the slot back; returns the claims of dead workers removed on the way out."""
        return []

    def once(
        self,
        task: str,
        *,
        done: Callable[[], bool],
        work: Callable[[], None],
        wait: bool = True,
        check_interrupt: Callable[[], None] = lambda: None,
    ) -> bool:
        """Run ``work()`` unless ``done()`` or another worker runs it; True when this one did."""
        if done():
            return False
        work()
        return True

    def running(self, number: int) -> contextlib.AbstractContextManager[Any]:
        """A context in which trial ``number`` is known to be alive (its heartbeat)."""
        return contextlib.nullcontext()

    def recover(self, records: StudyRecords) -> list[int]:
        """Fail the trials of dead workers, queue each for one retry; returns their numbers."""
        return []

    def busy(self, records: StudyRecords, budget: int) -> bool:
        """Whether finished trials and those other workers are running reach ``budget`` (then
        this worker waits instead of starting one that could be surplus)."""
        return self.surplus(records, sys.maxsize, budget)  # as if every running one came first

    def surplus(self, records: StudyRecords, number: int, budget: int) -> bool:
        """Whether trial ``number``, just asked, is one too many: the finished trials and the
        running ones asked before it reach ``budget`` (two workers asked in the same instant)."""
        return False

    def wait(self) -> None:
        """Pause before looking at the other workers' trials again."""


class SharedCoordinator(Claims, Coordinator):
    """Workers sharing one study through its storage (see the module docstring): the study's
    :class:`~.claims.Claims` (its constructor's arguments), which run the work done once per
    study, with heartbeats and recovery of dead workers' trials."""

    once = Claims.run_once
    _slot: Claim | None = None

    def join(self) -> int:
        self._slot = self.slot()
        return int(self._slot.task.split(":")[1])

    def leave(self) -> list[str]:
        swept = self.sweep(keep=[self._slot] if self._slot else [])
        if self._slot is not None:
            self.release(self._slot)
            self._slot = None
        return swept

    def running(self, number: int) -> contextlib.AbstractContextManager[Any]:
        return trial_pulse(self.storage, self.study, number, self.liveness.interval)

    def recover(self, records: StudyRecords) -> list[int]:
        return recover_dead_trials(records, self.storage, self.liveness.grace)

    def surplus(self, records: StudyRecords, number: int, budget: int) -> bool:
        # the trials that count against the budget: finished (complete or pruned) and running
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        counted = records.study.get_trials(deepcopy=False, states=states)
        ahead = [t for t in counted if t.state != TrialState.RUNNING or t.number < number]
        return len(ahead) >= budget

    def wait(self) -> None:
        time.sleep(self.liveness.poll)


def coordinator_for(
    storage: Any, study: str, liveness: Liveness, log: Callable[[str], None]
) -> Coordinator:
    """The coordinator of a study on ``storage``: local for an in-memory storage (no other
    process can see it), shared for every other."""
    if isinstance(storage, optuna.storages.InMemoryStorage):
        return Coordinator(liveness)
    return SharedCoordinator(storage, study, liveness, log=log)

"""Work that runs once per study, whatever the number of workers: claims in the study's storage.

Several processes (on one host or many) may work on one study. Most of the work is trials, which
Optuna hands out one per ``ask``; the rest must run exactly once across all of them: the study's
setup (contamination assessment, meta records, queueing hand recipes), each baseline, each holdout
re-score (with its memorization probe). A worker *claims* such a task before it runs it.

A claim on task ``T`` is a study named ``<study>::claim::<T>#<gen>`` in the same storage. Creating a
study whose name exists raises ``DuplicatedStudyError`` in every Optuna storage (a unique index in
RDB storages; in the journal, the first CREATE_STUDY record of the log wins), so exactly one worker
creates it: that worker owns ``T``. (``set_study_user_attr`` is an upsert, not a test-and-set, so an
attribute cannot serve; no other public Optuna call is an atomic test-and-set on a name.) While it
works, the owner beats every ``interval`` seconds: on RDB storages the claim study holds one RUNNING
trial whose Optuna heartbeat the owner records, exactly as for a searched trial; on the journal
storage (no heartbeats) it raises a ``beat`` counter in the claim's attributes.

Another worker that meets the claim looks, in this order:

- is the work done? (``done()``, read from the study's own records) - then there is nothing to do;
- is the owner dead? Its pid is gone (same host), or its heartbeat is older than ``grace`` seconds
  by the database's clock (``optuna.storages.fail_stale_trials`` on the claim study), or, without
  heartbeats, its beat counter has not changed for ``grace`` seconds of the observer's own clock
  (no two hosts' clocks are ever compared) - then it takes the task over by creating generation
  ``gen + 1``, again an atomic create;
- else it waits (or, for work it need not wait for, moves on).

The owner writes the task's record into the study first, then deletes the claim studies of every
generation: the storage holds claim studies only while their work is under way, or orphaned by a
dead owner until someone takes over, so ``optuna-dashboard`` and ``evomerge results`` see the study
itself (readers skip names with ``::claim::``). An owner that fails or is interrupted deletes its
claim too, so that another worker can claim the task at once, and a worker that stops deletes the
claims of owners known dead (:meth:`Claims.sweep`). A *held* claim (:meth:`Claims.acquire`
without ``done``) is a worker slot: ``worker:<k>`` numbers the live workers of a study.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any

from evomerge.search.distributed.liveness import (
    HOST,
    Liveness,
    Pulse,
    fail_stale,
    heartbeats,
    pid_alive,
)

__all__ = ["CLAIM", "is_claim", "Claim", "Claims"]

CLAIM = "::claim::"


def is_claim(study_name: str) -> bool:
    """Whether a study name is a claim (not a study of its own)."""
    return CLAIM in study_name


@dataclass
class Claim:
    """A claim this process holds: generation ``gen`` of ``task``, study ``study_id``."""

    task: str
    gen: int
    study_id: int
    pulse: Pulse


def _set_beat(storage: Any, sid: int, count: Iterator[int]) -> None:
    storage.set_study_user_attr(sid, "beat", next(count))


class Claims:
    """Claims on the tasks of study ``study`` in ``storage`` (see the module docstring).

    Args:
        storage: the study's raw Optuna storage (RDB or journal).
        study: the study's name.
        liveness: beat interval, grace period and polling interval.
        log: progress lines (takeovers).

    Example:
        >>> claims = Claims(storage, "demo", Liveness())                        # doctest: +SKIP
        >>> claims.run_once("baseline:uniform", done=lambda: False, work=run)   # doctest: +SKIP
        True
    """

    def __init__(
        self,
        storage: Any,
        study: str,
        liveness: Liveness,
        *,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.storage, self.study, self.liveness = storage, study, liveness
        self.log = log or (lambda msg: None)
        # claim study id -> (beat, when it was first seen)
        self._seen: dict[int, tuple[Any, float]] = {}

    def name(self, task: str, gen: int) -> str:
        return f"{self.study}{CLAIM}{task}#{gen}"

    # ------------------------------------------------------------------ one claim study
    def _create(self, task: str, gen: int) -> Claim | None:
        import optuna
        from optuna.study import StudyDirection

        try:
            sid = self.storage.create_new_study([StudyDirection.MINIMIZE], self.name(task, gen))
        except optuna.exceptions.DuplicatedStudyError:
            return None
        owner = {
            "host": HOST,
            "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.storage.set_study_user_attr(sid, "owner", owner)
        if heartbeats(self.storage):  # the claim's one RUNNING trial carries Optuna's heartbeat
            beat = partial(self.storage.record_heartbeat, self.storage.create_new_trial(sid))
        else:  # a counter in the claim's attributes
            count = itertools.count(1)
            beat = partial(_set_beat, self.storage, sid, count)
        pulse = Pulse(beat, self.liveness.interval, name=f"evomerge-claim-{task}")
        return Claim(task, gen, sid, pulse.start())

    def _look(self, name: str) -> tuple[str, dict[str, Any]]:
        """``("missing" | "live" | "dead", owner)`` of the claim study ``name``."""
        import optuna
        from optuna.trial import TrialState

        try:
            sid = self.storage.get_study_id_from_name(name)
            attrs = self.storage.get_study_user_attrs(sid)
            owner = attrs.get("owner") or {}
            pid = owner.get("pid")
            if (
                owner.get("host") == HOST
                and isinstance(pid, int)
                and pid != os.getpid()
                and not pid_alive(pid)
            ):
                return "dead", owner
            if heartbeats(self.storage) and self.storage.get_all_trials(sid, deepcopy=False):
                # the database's clock decides, as for trials
                sampler = optuna.samplers.RandomSampler()
                fail_stale(
                    optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)
                )
                trial = self.storage.get_all_trials(sid, deepcopy=False)[0]
                return ("live" if trial.state == TrialState.RUNNING else "dead"), owner
        except KeyError:
            return "missing", {}
        # No heartbeat (journal storage, or a claim a moment old): a beat that does not change
        # for ``grace`` seconds of this process's clock.
        beat, now = attrs.get("beat"), time.monotonic()
        seen = self._seen.get(sid)
        if seen is None or seen[0] != beat:
            self._seen[sid] = (beat, now)
            return "live", owner
        return ("dead" if now - seen[1] > self.liveness.grace else "live"), owner

    def _delete(self, name: str) -> None:
        try:
            self.storage.delete_study(self.storage.get_study_id_from_name(name))
        except KeyError:
            pass

    # ------------------------------------------------------------------ the public surface
    def acquire(self, task: str) -> Claim | None:
        """Own ``task`` now (taking over from a dead owner), or None while a live worker owns it."""
        gen = 0
        while True:
            claim = self._create(task, gen)
            if claim is not None:
                return claim
            state, owner = self._look(self.name(task, gen))
            if state == "live":
                return None
            if state == "dead":
                self.log(
                    f"{task}: its worker (pid {owner.get('pid')} on {owner.get('host')}) is gone; taking it over"
                )
                gen += 1
            # "missing": released or finished meanwhile; try this generation again

    def release(self, claim: Claim) -> None:
        """Drop ``claim``: its work is done and recorded, or given up (then another worker may
        claim the task at once). The claim studies of earlier generations go too: their owners
        were found dead when this one took over."""
        claim.pulse.stop()
        for gen in range(claim.gen, -1, -1):
            self._delete(self.name(claim.task, gen))

    def run_once(
        self,
        task: str,
        *,
        done: Callable[[], bool],
        work: Callable[[], None],
        wait: bool = True,
        check_interrupt: Callable[[], None] = lambda: None,
    ) -> bool:
        """Run ``work()`` unless ``done()`` or another worker runs it.

        Args:
            task: the task's name (``setup``, ``baseline:<name>``, ``holdout:<number>``).
            done: whether the task's record is in the study (a fresh read: other workers write it).
            work: does the task and writes its record.
            wait: while another live worker owns the task, wait until it is done (taking it over
                if that worker dies); False: return at once.
            check_interrupt: raises KeyboardInterrupt once Ctrl-C was pressed (called while waiting).

        Returns:
            True when this worker ran ``work``.

        Raises:
            Whatever ``work`` raises, after releasing the claim.
        """
        while True:
            if done():
                return False
            claim = self.acquire(task)
            if claim is None:
                if not wait:
                    return False
                check_interrupt()
                time.sleep(self.liveness.poll)
                continue
            try:
                if done():  # finished by another worker between our look and our claim
                    return False
                work()
            finally:
                self.release(claim)
            return True

    def sweep(self, keep: Iterable[Claim] = ()) -> list[str]:
        """Delete this study's claims whose owner is known dead now (its pid gone from this host,
        or its heartbeat stale by the database's clock), except ``keep``; returns their names.
        A worker sweeps as it stops, so that a killed worker's claims do not stay behind."""
        prefix = f"{self.study}{CLAIM}"
        kept = {self.name(c.task, c.gen) for c in keep}
        dead = []
        for s in self.storage.get_all_studies():
            if (
                s.study_name.startswith(prefix)
                and s.study_name not in kept
                and self._look(s.study_name)[0] == "dead"
            ):
                self._delete(s.study_name)
                dead.append(s.study_name)
        return dead

    def slot(self) -> Claim:
        """Hold ``worker:<k>`` for the lowest free ``k``: this worker's number among the study's
        live workers (0 when it works alone). Release it when the worker stops."""
        k = 0
        while True:
            claim = self.acquire(f"worker:{k}")
            if claim is not None:
                return claim
            k += 1

"""Dead workers: a trial left RUNNING by a process that died (``kill -9``, power loss, a vanished
host) is marked failed with the reason, and its parameters are queued for one retry, by whichever
live worker of the study notices first (or by the next run of the search).

Two ways to notice, both checked by every worker before each trial:

- **Heartbeats** (RDB storages: PostgreSQL, MySQL, SQLite): while a trial runs, its worker records
  a heartbeat every ``interval`` seconds (Optuna's ``RDBStorage.record_heartbeat``, on a thread of its
  own). ``optuna.storages.fail_stale_trials`` fails a trial without one for ``grace`` seconds and
  calls :func:`on_stale` for it, in the one process whose update changed the trial's state: the
  retry is queued once. Both times are the database's clock, so this works across hosts.
- **The owner's pid** (``proc`` attribute; this host only, any storage): a trial whose process is
  gone is failed at once, without waiting for the grace period. Optuna's journal storage has no
  heartbeat, so there this is the only way: a journal study is for one host.

A trial whose worker is alive but failed to beat for ``grace`` seconds is failed all the same; that
worker then finds it finished when it reports its result, and counts it as failed (nothing is
counted twice).
"""

from __future__ import annotations

import os
from datetime import datetime
from functools import partial
from typing import Any

import optuna
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from evomerge.search.distributed.claims import is_claim
from evomerge.search.distributed.liveness import HOST, Pulse, fail_stale, heartbeats, pid_alive
from evomerge.search.records import StudyRecords

__all__ = ["trial_pulse", "on_stale", "recover_dead_trials"]


def trial_pulse(storage: Any, study_name: str, number: int, interval: float) -> Pulse:
    """A :class:`Pulse` recording the heartbeat of trial ``number`` (a no-op without heartbeats)."""
    if not heartbeats(storage):
        return Pulse(lambda: None, 3600.0)
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number
    )
    beat = partial(storage.record_heartbeat, trial_id)
    return Pulse(beat, interval, name=f"evomerge-heartbeat-{number}")


def _fail_and_retry(records: StudyRecords, t: Any, message: str) -> None:
    records.mark_died(t.number, message)
    if t.params:  # Optuna's retry: the same point queued once more (a retry is not retried)
        RetryFailedTrialCallback(max_retry=1)(records.study, t)


def on_stale(study: Any, trial: Any) -> None:
    """Optuna's ``heartbeat_stale_trial_callback``: record why the trial failed, queue its retry
    (a claim's heartbeat trial has nothing to record: its claim study goes away)."""
    if is_claim(study.study_name):
        return
    pid, host = StudyRecords.owner(trial)
    _fail_and_retry(
        StudyRecords(study),
        trial,
        f"worker {pid} on {host} died while this trial was running (no heartbeat)",
    )


def recover_dead_trials(records: StudyRecords, storage: Any, grace: float) -> list[int]:
    """Fail the RUNNING trials whose process is gone (this host, by pid), whose heartbeat
    stopped (any host), or that no process claimed within ``grace`` seconds of their start (a
    worker killed between asking for a trial and claiming it); queue each one's parameters once.

    Args:
        records: the study's records.
        storage: the raw storage the study was opened on (for trial-level updates).
        grace: seconds after which a trial nobody claimed is taken as dead.

    Returns:
        The numbers of the trials found dead (by this process or, at the same moment, another).
    """
    study = records.study
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    dead = []
    study_id = storage.get_study_id_from_name(study.study_name)
    now = datetime.now()
    for t in running:
        pid, host = records.owner(t)
        if pid is None:  # never claimed: its worker died (or was interrupted) right after asking
            started = t.datetime_start
            if started is None or (now - started).total_seconds() < grace:
                continue
            why = "its worker stopped before it claimed the trial (no owner)"
        elif host != HOST or (pid != os.getpid() and pid_alive(int(pid))):
            continue
        else:
            why = f"process {pid} died while this trial was running"
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:  # one process wins this update; only it records the death and queues the retry
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        _fail_and_retry(records, t, why)
        dead.append(t.number)
    if heartbeats(storage):
        fail_stale(study)  # calls on_stale for each trial it failed
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        attrs = records.refresh().attrs()
        dead += [
            t.number
            for t in running
            if t.number not in still and t.number not in dead and f"died:{t.number}" in attrs
        ]
    return sorted(dead)

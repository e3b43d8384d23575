"""Trials left RUNNING by a process that died (``kill -9``, power loss): found on resume, marked
failed with the reason, and their parameters queued for one retry."""

from __future__ import annotations

import os

from evomerge.search.records import HOST, StudyRecords

__all__ = ["recover_dead_trials"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(records: StudyRecords) -> list[int]:
    """Fail this host's RUNNING trials whose process is gone; queue each one's parameters once.

    Returns:
        The numbers of the trials marked failed.
    """
    from optuna.trial import TrialState

    study = records.study
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, host = records.owner(t)
        if host != HOST or pid is None or (pid != os.getpid() and _pid_alive(int(pid))):
            continue
        records.mark_died(t.number, f"process {pid} died while this trial was running")
        study.tell(t.number, state=TrialState.FAIL)
        dead.append(t.number)
        if records.retry_of(t) is None and t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return dead

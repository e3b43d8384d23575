"""How the workers of a study tell each other they are alive: the intervals (:class:`Liveness`), a
beat on a thread of its own (:class:`Pulse`), and the two tests of death, a pid gone from this host
(:func:`pid_alive`) and a storage that records heartbeats (:func:`heartbeats`, RDB storages; Optuna
compares them with the database's clock, so no two hosts' clocks are compared)."""

from __future__ import annotations

import os
import socket
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["HOST", "Liveness", "Pulse", "pid_alive", "heartbeats", "fail_stale"]

# This host's name in a trial's ``proc`` and a claim's owner (a dead process is recognised by its
# pid on its own host only). EVOMERGE_HOST overrides it where hosts share a name (containers
# started with one --hostname on several machines) and in tests that play several hosts on one.
HOST = os.environ.get("EVOMERGE_HOST") or socket.gethostname()


@dataclass(frozen=True)
class Liveness:
    """How workers tell each other they are alive.

    Attributes:
        interval: seconds between heartbeats of a running trial, and beats of a held claim.
        grace: seconds without a heartbeat after which another worker declares the owner dead
            (Optuna's ``grace_period``; several intervals, so that one slow beat is not a death).
        poll: seconds between looks while waiting for another worker.
    """

    interval: int = 10
    grace: int = 60
    poll: float = 2.0

    def __post_init__(self) -> None:
        if not (self.interval >= 1 and self.grace > self.interval and self.poll > 0):
            raise ValueError(
                f"`1 <= interval < grace` and `poll > 0` must hold, but got (interval={self.interval}, grace={self.grace}, poll={self.poll})"
            )


class Pulse:
    """Calls ``beat()`` now and then every ``interval`` seconds on a daemon thread, until stopped.

    A beat that raises is skipped (a missed beat is what the grace period is for; the claim or
    trial may also have been taken over or deleted meanwhile).
    """

    def __init__(
        self, beat: Callable[[], None], interval: float, name: str = "evomerge-pulse"
    ) -> None:
        self._beat, self._interval = beat, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - see the class docstring
                pass
            if self._stop.wait(self._interval):
                return

    def start(self) -> Pulse:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Pulse:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def heartbeats(storage: Any) -> bool:
    """Whether ``storage`` records heartbeats of running trials (an RDB storage opened with a
    :class:`Liveness`)."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get is not None and get() is not None


def fail_stale(study: Any) -> None:
    """Fail the trials of ``study`` whose heartbeat is stale (``optuna.storages.fail_stale_trials``,
    an experimental Optuna function: its warning is silenced)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

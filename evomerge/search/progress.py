"""What a search shows while it runs: a progress bar over the trial budget and one line per trial;
and how it takes Ctrl-C (:class:`Interrupts`)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from evomerge.search.records import TrialRecord

__all__ = ["Progress", "Interrupts"]


class Progress:
    """The progress bar (none when ``quiet``) and the trial lines of a search.

    Args:
        total: the trial budget.
        done: trials finished before this run (a resumed study).
        quiet: no bar and no trial lines.
        log: where lines go when there is no bar.
    """

    def __init__(self, total: int, done: int, *, quiet: bool, log: Callable[[str], None]) -> None:
        self.total, self.quiet, self.log = total, quiet, log
        self.bar: Any = None
        if not quiet and done < total:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=done,
                desc="trials",
                unit="trial",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,
            )

    def finished(self, n: int) -> None:
        """``n`` trials of the study are finished (this worker's and the others')."""
        if self.bar is not None and n > self.bar.n:
            self.bar.update(min(n, self.total) - self.bar.n)

    def trial(self, state: str, number: int, rec: TrialRecord, best: float) -> None:
        """The line of a trial this worker ran."""
        line = f"trial {number:>3} {state:8}"
        if state == "PRUNED" and rec.search is not None:
            est = f", estimate {rec.estimate:.3f}" if rec.estimate is not None else ""
            line += f" score {rec.search.aggregate:.3f} on {rec.search.n_items} items (stopped early{est})  {rec.method or ''}"
        elif state == "COMPLETE" and rec.search is not None:
            line += f" score {rec.search.aggregate:.3f}  merge {rec.merge_s or 0:.2f}s eval {rec.eval_s or 0:.2f}s  {rec.method or ''}"
            if self.bar is not None:
                self.bar.set_postfix(best=f"{max(best, rec.search.aggregate):.3f}")
        else:
            line += f" {rec.error}"
        if self.bar is not None and state in ("COMPLETE", "PRUNED"):
            self.bar.update(1)
        if not self.quiet:
            (self.bar.write if self.bar is not None and not self.bar.disable else self.log)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Interrupts:
    """Ctrl-C during a search: remembered even where a library on the stack swallows the
    ``KeyboardInterrupt`` (a database driver in the middle of a commit may), and re-raised by
    :meth:`check` at the next step; while :attr:`deferred`, only remembered (a trial being claimed
    must not be left half-claimed). A context manager that installs the handler on the main
    thread and restores the previous one."""

    def __init__(self) -> None:
        self.interrupted = False
        self.deferred = False
        self._restore: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        if not self.deferred:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed."""
        if self.interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._restore = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._restore is not None:
            signal.signal(signal.SIGINT, self._restore)
            self._restore = None

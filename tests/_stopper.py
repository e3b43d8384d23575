"""Stop a search at a chosen point of a trial (for the fault tests): the function a trial passes
at that point is patched to call ``stop()`` when trial 2 passes it (once)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# point -> (owner of the function, its name, stop before or after it runs), in the order a trial
# passes them.
POINTS = {
    "asked": ("optuna.study.Study", "ask", "after"),
    "claimed": ("evomerge.search.records.StudyRecords", "claim", "after"),
    "merging": ("evomerge.search.candidates.Candidates", "materialize", "before"),
    "scoring": ("evomerge.search.pruning.RoundScorer", "score", "before"),
    "recorded": ("evomerge.search.records.StudyRecords", "set_trial", "after"),
    "told": ("optuna.study.Study", "tell", "after"),
    "table": ("evomerge.search.table", "atomic_file", "before"),
}
TRIAL = 2


def _owner(target: str) -> Any:
    mod, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return importlib.import_module(target)


def install(point: str, stop: Callable[[], None], setattr: Callable[..., None] = setattr) -> None:
    """Patch the function of ``point`` to call ``stop()`` in trial :data:`TRIAL` (``setattr``:
    pytest's ``monkeypatch.setattr`` to undo it after a test)."""
    current: dict[str, int | None] = {"trial": None, "stopped": 0}
    records = _owner("evomerge.search.records.StudyRecords")
    claim = records.claim

    def track(trial: Any) -> None:  # the trial being run, for the functions not given it
        current["trial"] = trial.number
        claim(trial)

    setattr(records, "claim", staticmethod(track))
    target, name, when = POINTS[point]
    owner = _owner(target)
    static = isinstance(vars(owner).get(name), staticmethod)
    orig = getattr(owner, name)

    def patched(*args: Any, **kwargs: Any) -> Any:
        numbers = [a.number for a in args if isinstance(getattr(a, "number", None), int)]
        hit = (numbers[0] if numbers else current["trial"]) == TRIAL and not current["stopped"]
        if point == "recorded":
            hit = hit and bool(args[-1].search)  # the trial's result, not its first record
        if when == "before" and hit:
            current["stopped"] = 1
            stop()
        out = orig(*args, **kwargs)
        if point == "asked":
            hit = getattr(out, "number", None) == TRIAL and not current["stopped"]
        if when == "after" and hit:
            current["stopped"] = 1
            stop()
        return out

    setattr(owner, name, staticmethod(patched) if static else patched)

"""One trial of a search: ask -> render -> merge -> score -> tell.

:meth:`TrialRunner.run` asks the sampler for a point (and claims the trial), renders the space's
recipe there, merges it into the resident model, scores it in rounds that may stop it early
(:mod:`evomerge.search.pruning`; a merge whose tensors were scored already takes their scores),
records it and tells the sampler. A new best is re-scored on the validation items at once, a hand
recipe also on the test items. Whatever a candidate raises fails that trial only; Ctrl-C fails it
too and goes on up.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from evomerge.errors import failure_line
from evomerge.io import dump_yaml
from evomerge.search.candidates import Candidates
from evomerge.search.distributed.coordinator import Coordinator
from evomerge.search.finalists import Holdout
from evomerge.search.progress import Interrupts
from evomerge.search.pruning import RoundScorer
from evomerge.search.records import StudyRecords, TrialRecord
from evomerge.search.samplers import suggester
from evomerge.search.setup import Setup

__all__ = ["TrialRunner"]


class TrialRunner:
    """Runs one trial at a time of a prepared search.

    Args:
        setup: the prepared search.
        candidates: merges and scores.
        rounds: scores a candidate in rounds (pruning).
        coordinator: the other workers (the trial's heartbeat).
        interrupts: Ctrl-C.
    """

    def __init__(
        self,
        setup: Setup,
        candidates: Candidates,
        rounds: RoundScorer,
        coordinator: Coordinator,
        interrupts: Interrupts,
    ) -> None:
        self.setup, self.candidates, self.rounds = setup, candidates, rounds
        self.coordinator, self.interrupts = coordinator, interrupts

    def run(
        self, records: StudyRecords, holdout: Holdout, best: float
    ) -> tuple[str, int, TrialRecord]:
        """One ask -> materialize -> evaluate -> tell round. ``best`` is the study's best search
        score so far (a better trial is re-scored on the validation items at once). Returns
        (state, trial number, record)."""
        s, study = self.setup, records.study
        # Optuna expects heartbeats with optimize(); ours: running()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            # Asking creates the trial RUNNING; until it is claimed no one could tell it from
            # another worker's, so Ctrl-C waits for the claim (a kill -9 here leaves a trial
            # nobody claimed, failed by the next run after the grace period).
            self.interrupts.deferred = True
            try:
                trial = study.ask()
                records.claim(trial)
            finally:
                self.interrupts.deferred = False
        rec = TrialRecord()
        if self.coordinator.surplus(records, trial.number, s.trials):
            rec.error = "not run: trials of other workers reached the budget"
            _fail(study, trial, rec)
            return "FAIL", trial.number, rec
        try:
            self.interrupts.check()
            with self.coordinator.running(trial.number):
                recipe = s.space.render(suggester(trial), s.layers_of, s.prompts)
                rec.method, rec.recipe = recipe.get("merge_method"), dump_yaml(recipe)
                t0 = time.perf_counter()
                model, merged = self.candidates.materialize(
                    recipe, f"{s.file} (trial {trial.number})"
                )
                rec.merge_s, rec.digest = time.perf_counter() - t0, merged.digest
                same = records.scored(merged.digest)
                if same is not None:  # these tensors were scored already: share their scores
                    rec.reused_from, rec.search = same
                    rec.eval_s = 0.0
                else:
                    rec.search, rec.estimate = self.rounds.score(
                        model, records, trial.report, prunable=not records.baseline_of(trial)
                    )
                    rec.eval_s = rec.search.seconds
                records.set_trial(trial, rec)  # one write for everything the table needs
                if rec.estimate is not None:  # stopped early: partial scores kept, no finalist
                    _tell(study, trial, state=TrialState.PRUNED)
                    return "PRUNED", trial.number, rec
                values = (
                    [rec.search.scores[o] for o in s.objectives]
                    if s.objectives
                    else rec.search.aggregate
                )
                _tell(study, trial, values)
        except UpdateFinishedTrialError:  # another worker failed it for no heartbeat
            rec = TrialRecord(
                error=f"marked failed by another worker (no heartbeat for {s.liveness.grace} s); its result was not counted"
            )
            return "FAIL", trial.number, rec
        except Exception as e:  # any failure of one candidate fails that trial only
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            rec.error = failure_line(e)
            _fail(study, trial, rec)
            return "FAIL", trial.number, rec
        except BaseException:  # Ctrl-C: never leave the trial RUNNING
            rec.error = "interrupted (Ctrl-C)"
            _fail(study, trial, rec)
            raise
        # A new best (or a hand recipe) is re-scored on the validation items while its model is
        # at hand; a hand recipe also on the test items, as baselines are.
        hand = bool(records.baseline_of(trial))
        if rec.search.aggregate > best or hand:
            holdout.rescore(trial.number, lambda: model, "validation", self.interrupts.check)
        if hand:
            holdout.rescore(trial.number, lambda: model, "test", self.interrupts.check)
        return "COMPLETE", trial.number, rec


def _tell(study: Any, trial: Any, values: Any = None, state: Any = None) -> None:
    """Tell Optuna, which raises ValueError for a trial another worker finished (it found the
    trial's heartbeat stale): raised as UpdateFinishedTrialError, what the storage raises."""
    try:
        study.tell(trial, values, state=state)
    except ValueError as e:
        if "Cannot tell a" in str(e):
            raise UpdateFinishedTrialError(str(e)) from None
        raise


def _fail(study: Any, trial: Any, rec: TrialRecord) -> None:
    """Record why a trial failed and tell it FAIL, unless it is finished already (by another
    worker, or before the failure)."""
    try:
        StudyRecords.set_trial(trial, rec)
        study.tell(trial, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - already finished: nothing to do
        pass

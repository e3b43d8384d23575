"""``evomerge search``: ask -> materialize in memory -> evaluate -> tell, until the budget is met.

One process, one set of opened sources, one resident model per output layout: every trial
writes its merged tensors into that model in place and lm-eval scores the model object directly
(task objects built once). :meth:`Search.run` reads top to bottom:

1. open the study and check it (a results table the storage cannot account for, inputs that
   changed since the study started: :mod:`evomerge.search.inputs`); fail the trials of workers
   that died; set the study up once (contamination assessment, what readers need, hand recipes
   queued as trials);
2. score the baselines (:mod:`evomerge.search.baselines`, :class:`~evomerge.search.finalists.Holdout`);
3. trials until ``search.trials`` are finished (complete or stopped early), or until they scored
   ``search.items`` search items, one at a time (ask, render, merge, score, tell:
   :mod:`evomerge.search.trial`); a new best is re-scored on the validation items at once;
4. the finalists are re-scored on the validation items and the chosen trial on the test items
   (:mod:`evomerge.search.finalists`); ``results/<study>/trials.csv`` is written after every step.

A candidate that raises anything while it is merged or scored (a bad point of the space, NaN
tensors, an evaluator error, CUDA out of memory) is a FAIL trial with the exception's type and
message in its ``error`` column, as Optuna's own ``optimize(catch=...)`` does; the study goes on.
Ctrl-C fails the running trial ("interrupted"), writes the table and exits with 130. Running the
same command again resumes the study: a trial left RUNNING by a process that died is failed and
retried once, and the sampler, seeded per trial, goes on where it stopped.

Several workers may run this loop on one study, on one host or many; everything they must agree
on goes through the :class:`~evomerge.search.distributed.coordinator.Coordinator` (work done once
per study, heartbeats, dead workers' trials, trials other workers are running).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.evaluation.base import Evaluator
from evomerge.search.candidates import Candidates
from evomerge.search.distributed.coordinator import Coordinator, coordinator_for
from evomerge.search.distributed.liveness import Liveness
from evomerge.search.finalists import Holdout
from evomerge.search.outcome import SearchOutcome
from evomerge.search.progress import Interrupts, Progress
from evomerge.search.pruning import RoundScorer
from evomerge.search.records import StudyRecords, TrialRecord
from evomerge.search.samplers import make_sampler
from evomerge.search.setup import Setup, prepare
from evomerge.search.table import write_trials_csv
from evomerge.search.trial import TrialRunner

__all__ = ["Search", "SearchOutcome", "run_search"]

# The trial states that count against the budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class Search:
    """A prepared search and its loop (see the module docstring).

    Args:
        setup: the prepared search (:func:`~evomerge.search.setup.prepare`).
        probe: run the Min-K%++ memorization probe on the trials re-scored for validation.
        quiet: no progress bar and no trial lines.

    Example:
        >>> Search(prepare("search_spaces/demo.yml", trials=8)).run().chosen["test"]  # doctest: +SKIP
    """

    def __init__(self, setup: Setup, *, probe: bool = False, quiet: bool = False) -> None:
        s = self.setup = setup
        self.quiet, self.probe = quiet, probe
        self.candidates = Candidates(s.merger, s.evaluator)
        self.rounds = RoundScorer(
            None if s.objectives else s.space.search.prune, self.candidates, s.log
        )
        self.coordinator: Coordinator = coordinator_for(s.storage, s.paths.name, s.liveness, s.log)
        self.interrupts = Interrupts()
        self.runner = TrialRunner(
            s, self.candidates, self.rounds, self.coordinator, self.interrupts
        )

    # ------------------------------------------------------------------ the study
    def open_study(self) -> StudyRecords:
        """Create or load the study (its sampler seeded per trial, see
        :class:`~evomerge.search.samplers.SeededPerTrial`)."""
        s = self.setup
        sampler = make_sampler(
            s.space.search.sampler,
            s.seed,
            s.trials,
            s.space.search.startup_trials,
            stopped_as_estimated=self.rounds.pruner is not None,
        )
        study = optuna.create_study(
            study_name=s.paths.name,
            storage=s.storage,
            sampler=sampler,
            load_if_exists=True,
            directions=["maximize"] * max(1, len(s.objectives)),
        )
        return StudyRecords(study)

    def run(self) -> SearchOutcome:
        """Run or resume the study to its budget; returns the outcome.

        Raises:
            EvomergeError: the study cannot go on as it is (see :mod:`evomerge.search.inputs`).
            KeyboardInterrupt: on Ctrl-C, after marking the running trial failed and writing the table.
        """
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s, start = self.setup, time.perf_counter()
        with self.interrupts:
            worker = self.coordinator.join()
            try:
                records = self.open_study()
                if worker:
                    s.log(f"worker {worker} of study {s.paths.name!r}")
                s.check(records)  # before anything is written
                self._recover(records)
                self.coordinator.once(
                    "setup",
                    done=lambda: records.refresh().setup_done(s.setup_digest),
                    work=lambda: s.set_up_study(records),
                    check_interrupt=self.interrupts.check,
                )
                s.warn_flags(records)
                holdout = Holdout(s, self.candidates, records, self.coordinator, self.probe)
                try:
                    holdout.baselines(wait=False, check_interrupt=self.interrupts.check)
                    write_trials_csv(records.study, s.paths.csv)
                    self._trials(records, holdout)
                    holdout.baselines(wait=True, check_interrupt=self.interrupts.check)
                    holdout.finalists(self.interrupts.check)
                except KeyboardInterrupt:
                    write_trials_csv(records.study, s.paths.csv)
                    raise
            finally:
                swept = self.coordinator.leave()
                if swept:
                    s.log(f"removed {len(swept)} claim(s) of dead workers")
        df = write_trials_csv(records.study, s.paths.csv)
        return SearchOutcome.from_table(s.paths, df, time.perf_counter() - start)

    # ------------------------------------------------------------------ the trials
    def _trials(self, records: StudyRecords, holdout: Holdout) -> None:
        """Trials until the study has ``trials`` finished ones (all workers'), or until they
        scored ``search.items`` search items."""
        s, study = self.setup, records.study
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        if done:
            s.log(
                f"study {s.paths.name!r}: {done} of {s.trials} trials already finished (complete or pruned)"
            )
        progress = Progress(s.trials, done, quiet=self.quiet, log=s.log)
        attempts = 0
        while attempts < 3 * s.trials + 10:
            self.interrupts.check()
            self._recover(records)
            finished = [
                (t, records.trial(t)) for t in study.get_trials(deepcopy=False, states=FINISHED)
            ]
            progress.finished(len(finished))
            if len(finished) >= s.trials or self._items_spent(records, finished):
                break
            if self.coordinator.busy(records, s.trials):  # other workers may fill the budget
                self.coordinator.wait()
                continue
            complete = [r.search for t, r in finished if t.state == TrialState.COMPLETE]
            best = max((sc.aggregate for sc in complete if sc), default=-math.inf)
            attempts += 1
            state, number, rec = self.runner.run(records, holdout, best)
            write_trials_csv(study, s.paths.csv)
            self.interrupts.check()
            progress.trial(state, number, rec, best)
        else:
            s.log(
                f"stopped after {attempts} attempts with {len(finished)} finished trials: too many failures (see the error column)"
            )
        progress.close()

    # ------------------------------------------------------------------ helpers of run()
    def _items_spent(self, records: StudyRecords, finished: list[tuple[Any, TrialRecord]]) -> bool:
        """Whether the searched trials finished so far scored ``search.items`` search items: a
        stopped trial counts the items it used, one that reused another's scores none; hand
        recipes do not count (as in the table)."""
        budget = self.setup.space.search.items
        if budget is None:
            return False
        spent = sum(rec.search_items or 0 for t, rec in finished if not records.baseline_of(t))
        if spent >= budget:
            self.setup.log(
                f"item budget reached: the searched trials scored {spent} search items (search.items: {budget})"
            )
        return spent >= budget

    def _recover(self, records: StudyRecords) -> None:
        dead = self.coordinator.recover(records)
        if dead:
            self.setup.log(
                f"trial(s) {', '.join(map(str, dead))} were running when their worker died: marked failed, parameters queued for one retry"
            )


def run_search(
    space_file: str | Path,
    *,
    trials: int | None = None,
    device: str | None = None,
    storage: str | None = None,
    study: str | None = None,
    seed: int | None = None,
    results_dir: str | Path = "results",
    evaluator: Evaluator | None = None,
    probe: bool = False,
    quiet: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
    liveness: Liveness | None = None,
) -> SearchOutcome:
    """Run (or resume) the search of a space.

    Args:
        space_file: the search space YAML.
        trials: the trial budget (default: the space's ``search.trials``).
        device: cpu or cuda[:N] (default: cuda when available).
        storage: an Optuna storage URL (default: the space's, else SQLite under ``results_dir``).
        study: the study name (default: the space's).
        seed: the sampler and mask seed (default: the space's ``search.seed``).
        results_dir: where study folders go.
        evaluator: an :class:`~evomerge.evaluation.base.Evaluator` instead of lm-eval.
        probe: run the Min-K%++ memorization probe on the trials re-scored for validation.
        quiet: no progress bar and no trial lines.
        threads: CPU threads for torch (default: 1 for models under 50M parameters).
        log: where progress lines go (default: stdout).
        liveness: heartbeat interval, grace period and polling of the study's workers.

    Returns:
        The :class:`~evomerge.search.outcome.SearchOutcome`.

    Raises:
        ConfigError / EvomergeError: anything wrong with the space, its models, its tasks or the
            storage; a study that cannot go on as it is.
        KeyboardInterrupt: on Ctrl-C, after the running trial was failed and the table written.

    Example:
        >>> out = run_search("search_spaces/demo.yml", trials=40)   # doctest: +SKIP
        >>> out.chosen["test"]                                       # doctest: +SKIP
    """
    setup = prepare(
        space_file,
        trials=trials,
        device=device,
        storage=storage,
        study=study,
        seed=seed,
        results_dir=results_dir,
        evaluator=evaluator,
        log=log,
        threads=threads,
        liveness=liveness,
    )
    return Search(setup, probe=probe, quiet=quiet).run()

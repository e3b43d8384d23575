"""``evomerge search``: ask -> materialize in memory -> evaluate -> tell, until the budget is met.

One process, one set of opened sources, one resident model per output layout: every trial
writes its merged tensors into that model in place and lm-eval scores the model object
directly (task objects built once). Every trial, failed ones included, is recorded in the
Optuna storage; ``results/<study>/trials.csv`` is rewritten after each one.

A candidate that raises anything while it is merged or scored (a bad point of the space, NaN
tensors, an evaluator error, CUDA out of memory) is a FAIL trial with the exception's type and
message in its ``error`` column, as Optuna's own ``optimize(catch=...)`` does; the study goes on.

Resume: running the same command again continues the study until ``trials`` trials have
completed in total. A trial left RUNNING by a process that died (``kill -9``, power loss) is
marked failed on resume and its parameters are retried once. Ctrl-C marks the current trial
failed ("interrupted"), writes the table and exits with 130.

Several workers, one study: any number of processes may run this loop on one storage, on one host
or many. Each asks Optuna for its own trials; the budget is the number of finished (COMPLETE or
PRUNED: stopped early, see :mod:`.pruning`) trials in the storage, counted before every trial, and a worker does not start a trial that the trials other
workers are running could make surplus (it waits for them instead). What runs once per study (the
setup, each baseline, each holdout re-score) runs under a claim (:mod:`.claims`); a dead worker's
trial is failed and retried by a live one (:mod:`.recovery`). Worker ``k`` (its slot among the
live workers) seeds its sampler with ``seed + k``, so that workers do not draw the same points.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.contamination.rules import assessment_from_dict, assessment_to_dict
from evomerge.errors import failure_line
from evomerge.evaluation.base import Evaluator
from evomerge.io import dump_yaml
from evomerge.search.baselines import enqueue_hand_recipes, run_baselines
from evomerge.search.candidates import Candidates
from evomerge.search.claims import Claim, Claims
from evomerge.search.finalists import Holdout
from evomerge.search.inputs import check_inputs, check_table
from evomerge.search.outcome import SearchOutcome
from evomerge.search.pruning import RoundScorer
from evomerge.search.records import StudyMeta, StudyRecords, TrialRecord
from evomerge.search.recovery import recover_dead_trials, trial_pulse
from evomerge.search.samplers import make_sampler, suggester
from evomerge.search.setup import Setup, prepare
from evomerge.search.storage import StudyPaths
from evomerge.search.table import write_trials_csv
from evomerge.space import Directive

__all__ = ["Search", "SearchOutcome", "run_search"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, Directive):
        return {
            "directive": x.kind,
            "name": x.name,
            "low": x.low,
            "high": x.high,
            "log": x.log,
            "step": x.step,
            "choices": list(x.choices),
            "anchors": x.anchors,
            "per_layers": x.per_layers,
        }
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class Search:
    """A prepared search (see :func:`~evomerge.search.setup.prepare` for the arguments), and its loop.

    Args:
        space_file: the search space YAML.
        probe: run the Min-K%++ memorization probe on finalists.
        quiet: no progress bar.
        **kwargs: passed to :func:`~evomerge.search.setup.prepare` (trials, device, storage, study,
            seed, results_dir, evaluator, log, threads, liveness).

    Raises:
        ConfigError / EvomergeError: anything wrong with the space, its models, its tasks or the
            storage (checked before anything is written).
    """

    def __init__(
        self,
        space_file: str | Path,
        *,
        probe: bool = False,
        quiet: bool = False,
        evaluator: Evaluator | None = None,
        **kwargs: Any,
    ) -> None:
        self.setup: Setup = prepare(space_file, evaluator=evaluator, **kwargs)
        self.quiet = quiet
        self.probe = probe
        self.candidates = Candidates(self.setup.merger, self.setup.evaluator)
        self.rounds = RoundScorer(
            None if self.setup.objectives else self.setup.space.search.prune,
            self.candidates,
            self.setup.log,
        )
        self.claims = Claims(
            self.setup.storage, self.setup.paths.name, self.setup.liveness, log=self.setup.log
        )
        self.worker = 0
        self._slot: Claim | None = None
        self._interrupted = False
        self._deferred = False  # Ctrl-C is only noted (not raised) while a trial is being claimed

    @property
    def paths(self) -> StudyPaths:
        return self.setup.paths

    # ------------------------------------------------------------------ the study
    def open_study(self) -> StudyRecords:
        """Create or load the study (its sampler seeded per trial, see
        :class:`~evomerge.search.samplers.SeededPerTrial`)."""
        import optuna

        s = self.setup
        sampler = make_sampler(
            s.space.search.sampler,
            s.seed,
            s.trials,
            s.space.search.startup_trials,
            bool(s.objectives),
            stopped_as_estimated=self.rounds.pruner is not None,
        )
        kw: dict[str, Any] = (
            {"directions": ["maximize"] * len(s.objectives)}
            if s.objectives
            else {"direction": "maximize"}
        )
        study = optuna.create_study(
            study_name=s.paths.name, storage=s.storage, sampler=sampler, load_if_exists=True, **kw
        )
        return StudyRecords(study)

    def _fingerprint(self) -> str:
        s = self.setup
        hand = {k: v for k, v in s.baselines.items() if k.startswith("hand:")}
        return json.dumps(
            {"tree": _jsonable(s.space.tree), "objectives": s.objectives}
            | ({"hand": hand} if hand else {}),  # a hand recipe's file may change alone
            sort_keys=True,
            default=str,
        )

    def set_up_study(self, records: StudyRecords) -> None:
        """Once per study (and again when the space changed): assess contamination, record what
        readers need, queue the hand recipes that are points of the space."""
        s = self.setup
        fingerprint = self._fingerprint()
        old = records.refresh().meta().space
        if old is not None and old != fingerprint:
            s.log(
                f"warning: the space changed since study {s.paths.name!r} started; earlier trials keep their recipes (use --study NEW to start afresh)"
            )
        s.assessment = s.assess()
        include = getattr(getattr(s.evaluator, "cfg", None), "include_path", None)
        records.set_meta(
            StudyMeta(
                space=fingerprint,
                space_file=str(Path(s.file).resolve()),
                seed=s.mask_seed,
                model_refs=s.space.model_refs(),
                include_path=list(include) if include else None,
                search_tasks=s.search_tasks,
                holdout_tasks=s.holdout_tasks,
                flags=s.assessment.columns() if s.assessment is not None else {},
                assessment=assessment_to_dict(s.assessment) if s.assessment is not None else None,
                stream=records.meta().stream
                if old is not None
                else s.merger.stream,  # a resumed study keeps its masks
                selection="validation" if "validation" in s.splits else "search",
                inputs=s.inputs,
            )
        )
        enqueue_hand_recipes(s.space, s.baselines, records, layers_of=s.layers_of, log=s.log)
        records.set_setup(_digest(fingerprint))

    def _holdout(self, records: StudyRecords) -> Holdout:
        s = self.setup
        base = s.space.tree.get("base_model")
        base_dir = (
            str(s.sources[base].path) if isinstance(base, str) and base in s.sources else None
        )
        return Holdout(
            self.candidates,
            records,
            self.claims,
            splits=s.splits,
            finalists=s.space.search.finalists,
            probe=self.probe,
            base_ref=base if isinstance(base, str) else None,
            base_dir=base_dir,
            tokenizer_dir=str(s.tokenizer_dir),
            device=s.device,
            seed=s.seed,
            file=s.file,
            log=s.log,
        )

    def run_trial(
        self, records: StudyRecords, holdout: Holdout, best: float
    ) -> tuple[str, int, TrialRecord]:
        """One ask -> materialize -> evaluate -> tell round, with the trial's heartbeat recorded
        while it runs. ``best`` is the study's best search score so far (a better trial gets its
        holdout re-score now). Returns (state, trial number, record)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        s, study = self.setup, records.study
        with (
            warnings.catch_warnings()
        ):  # Optuna expects heartbeats with optimize(); ours are recorded by trial_pulse
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            # Asking creates the trial RUNNING; until it is claimed no one could tell it from
            # another worker's, so Ctrl-C waits for the claim (a kill -9 here leaves a trial
            # nobody claimed: recover_dead_trials fails it after the grace period).
            self._deferred = True
            try:
                trial = study.ask()
                records.claim(trial)
            finally:
                self._deferred = False
        try:
            self._check_interrupt()
            if self._surplus(records, trial.number):
                rec = TrialRecord(error="not run: trials of other workers reached the budget")
                records.set_trial(trial, rec)
                study.tell(trial, state=TrialState.FAIL)
                return "FAIL", trial.number, rec
            with trial_pulse(s.storage, s.paths.name, trial.number, s.liveness.interval):
                return self._run_trial(records, holdout, trial, best)
        except (UpdateFinishedTrialError, _Finished):
            rec = TrialRecord(
                error=f"marked failed by another worker (no heartbeat for {s.liveness.grace} s); its result was not counted"
            )
            return "FAIL", trial.number, rec
        except BaseException:
            # Ctrl-C (or anything) between ask and the trial's own handling: never leave the
            # trial RUNNING, or the next run would wait for it.
            _fail_quietly(study, trial, "interrupted (Ctrl-C)")
            raise

    def _surplus(self, records: StudyRecords, number: int) -> bool:
        # Another worker may have asked at the same moment: the trials that count first are the
        # finished ones (complete or pruned) and the running ones asked before this one.
        from optuna.trial import TrialState

        ahead = [
            t
            for t in records.study.get_trials(deepcopy=False, states=_counted())
            if t.state != TrialState.RUNNING or t.number < number
        ]
        return len(ahead) >= self.setup.trials

    def _budget_spent(self, records: StudyRecords, finished: list[tuple[Any, TrialRecord]]) -> bool:
        """Whether the searched trials finished so far (every worker's; (trial, record) pairs) scored
        ``search.items`` search items or more: the item budget, beside ``trials``. A trial stopped
        early counts the items it used, one that reused another's scores none; hand recipes do not
        count (as in the table)."""
        budget = self.setup.space.search.items
        if budget is None:
            return False
        spent = sum(rec.search_items or 0 for t, rec in finished if not records.baseline_of(t))
        if spent >= budget:
            self.setup.log(
                f"item budget reached: the searched trials scored {spent} search items (search.items: {budget})"
            )
        return spent >= budget

    def _run_trial(
        self, records: StudyRecords, holdout: Holdout, trial: Any, best: float
    ) -> tuple[str, int, TrialRecord]:
        from optuna.trial import TrialState

        s, study = self.setup, records.study
        rec = TrialRecord()
        try:
            recipe = s.space.render(suggester(trial), s.layers_of)
            rec.method, rec.recipe = recipe.get("merge_method"), dump_yaml(recipe)
            t0 = time.perf_counter()
            model, res = self.candidates.materialize(recipe, f"{s.file} (trial {trial.number})")
            rec.merge_s, rec.digest = time.perf_counter() - t0, res.digest
            same = records.scored(res.digest)
            if same is not None:  # these tensors were scored already: share their scores
                rec.reused_from, rec.search = same
                rec.eval_s = 0.0
            else:
                rec.search, rec.estimate = self.rounds.score(
                    model,
                    records,
                    lambda v, n: trial.report(v, n),
                    prunable=not records.baseline_of(trial),
                )
                rec.eval_s = rec.search.seconds
                if (
                    rec.estimate is not None
                ):  # stopped early: its partial scores and items are kept, it is no finalist
                    records.set_trial(trial, rec)
                    _tell(study, trial, state=TrialState.PRUNED)
                    return "PRUNED", trial.number, rec
        except KeyboardInterrupt:
            rec.error = "interrupted (Ctrl-C)"
            records.set_trial(trial, rec)
            _tell(study, trial, state=TrialState.FAIL)
            raise
        except Exception as e:  # any failure of one candidate fails that trial only
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            rec.error = failure_line(e)
            records.set_trial(trial, rec)
            _tell(study, trial, state=TrialState.FAIL)
            return "FAIL", trial.number, rec
        records.set_trial(trial, rec)  # one write for everything the table needs (each is a commit)
        scores = rec.search
        _tell(
            study,
            trial,
            [scores.scores[o] for o in s.objectives] if s.objectives else scores.aggregate,
        )
        # Every new best (and hand recipe) is re-scored on the validation items now, while its
        # model is at hand; a hand recipe is scored on the test items too, as baselines are.
        if scores.aggregate > best or records.baseline_of(trial):
            holdout.rescore(trial.number, model, "validation", self._check_interrupt)
        if records.baseline_of(trial):
            holdout.rescore(trial.number, model, "test", self._check_interrupt)
        return "COMPLETE", trial.number, rec

    def run(self) -> SearchOutcome:
        """Run or resume the study to its budget; returns the outcome.

        Raises:
            KeyboardInterrupt: on Ctrl-C, after marking the running trial failed and writing the table.
        """
        # Remember Ctrl-C even if a library on the stack swallows the KeyboardInterrupt (a
        # database driver in the middle of a commit may): the loop re-raises it at the next step.
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._interrupted = False
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.getsignal(signal.SIGINT)

            def on_sigint(signum: int, frame: Any) -> None:
                self._interrupted = True
                if not self._deferred:
                    raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)
        try:
            self._slot = slot = self.claims.slot()
            try:
                self.worker = int(slot.task.split(":")[1])
                return self._run()
            finally:
                self.claims.release(slot)
                self._slot = None
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def _check_interrupt(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    def _run(self) -> SearchOutcome:
        s = self.setup
        start = time.perf_counter()
        records = self.open_study()
        study = records.study
        if self.worker:
            s.log(f"worker {self.worker} of study {s.paths.name!r}")
        # Nothing is written before these checks: a table the storage cannot account for is kept,
        # and a study whose inputs changed is not mixed with new scores.
        check_table(study, s.paths.csv)
        stored = records.meta().inputs
        check_inputs(stored, s.inputs, file=s.file, study=s.paths.name)
        if stored is None and records.meta().space is not None:  # set up before inputs were kept
            records.set_inputs(s.inputs)
        self._log_dead(recover_dead_trials(records, s.storage, s.liveness.grace))
        fingerprint = _digest(self._fingerprint())
        self.claims.run_once(
            "setup",
            done=lambda: records.refresh().setup_done(fingerprint),
            work=lambda: self.set_up_study(records),
            check_interrupt=self._check_interrupt,
        )
        s.merger.stream = (
            records.refresh().meta().stream
        )  # the study's random stream (1 for studies made before streams)
        self._warn_flags(records)
        holdout = self._holdout(records)
        try:
            run_baselines(
                s.space,
                s.baselines,
                self.candidates,
                records,
                self.claims,
                splits=s.splits,
                log=s.log,
                check_interrupt=self._check_interrupt,
                wait=False,
            )
            write_trials_csv(study, s.paths.csv)
            self._search(records, holdout)
            run_baselines(
                s.space,
                s.baselines,
                self.candidates,
                records,
                self.claims,
                splits=s.splits,
                log=s.log,
                check_interrupt=self._check_interrupt,
                wait=True,
            )
            holdout.finalists(self._check_interrupt)
        except KeyboardInterrupt:
            write_trials_csv(study, s.paths.csv)
            raise
        swept = self.claims.sweep(keep=[self._slot] if self._slot else [])
        if swept:
            s.log(f"removed {len(swept)} claim(s) of dead workers")
        df = write_trials_csv(study, s.paths.csv)
        return SearchOutcome.from_table(s.paths, df, time.perf_counter() - start)

    def _warn_flags(self, records: StudyRecords) -> None:
        s = self.setup
        if s.assessment is None:  # another worker set the study up: its assessment is in the study
            stored = records.refresh().meta().assessment
            s.assessment = assessment_from_dict(stored) if stored else None
        if s.assessment is not None:
            for w in s.assessment.warnings():
                s.log(w)

    def _log_dead(self, dead: list[int]) -> None:
        if dead:
            self.setup.log(
                f"trial(s) {', '.join(map(str, dead))} were running when their worker died: marked failed, parameters queued for one retry"
            )

    def _search(self, records: StudyRecords, holdout: Holdout) -> int:
        """Trials until the study has ``trials`` finished ones (all workers'), or until they scored
        ``search.items`` search items; returns the count."""
        from optuna.trial import TrialState

        s, study = self.setup, records.study
        n_done = len(study.get_trials(deepcopy=False, states=_finished()))
        if n_done:
            s.log(
                f"study {s.paths.name!r}: {n_done} of {s.trials} trials already finished (complete or pruned)"
            )
        bar = None
        if not self.quiet and n_done < s.trials:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=s.trials,
                initial=n_done,
                desc="trials",
                unit="trial",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,
            )
        attempts = 0
        while attempts < 3 * s.trials + 10:
            self._check_interrupt()
            self._log_dead(recover_dead_trials(records, s.storage, s.liveness.grace))
            trials = study.get_trials(deepcopy=False, states=_counted())
            finished = [
                (t, records.trial(t)) for t in trials if t.state != TrialState.RUNNING
            ]  # each record read once
            n_done = len(finished)
            if bar is not None and n_done > bar.n:
                bar.update(min(n_done, s.trials) - bar.n)
            if n_done >= s.trials:
                break
            if self._budget_spent(records, finished):
                break
            if (
                len(trials) >= s.trials
            ):  # other workers' running trials may fill the budget: wait for them
                time.sleep(s.liveness.poll)
                continue
            best = max(
                (
                    r.search.aggregate
                    for t, r in finished
                    if t.state == TrialState.COMPLETE and r.search is not None
                ),
                default=-math.inf,
            )
            attempts += 1
            state, number, rec = self.run_trial(records, holdout, best)
            write_trials_csv(study, s.paths.csv)
            self._check_interrupt()
            line = f"trial {number:>3} {state:8}"
            if state == "PRUNED" and rec.search is not None:
                est = f", estimate {rec.estimate:.3f}" if rec.estimate is not None else ""
                line += f" score {rec.search.aggregate:.3f} on {rec.search.n_items} items (stopped early{est})  {rec.method or ''}"
                if bar is not None:
                    bar.update(1)
            elif state == "COMPLETE" and rec.search is not None:
                line += f" score {rec.search.aggregate:.3f}  merge {rec.merge_s or 0:.2f}s eval {rec.eval_s or 0:.2f}s  {rec.method or ''}"
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{max(best, rec.search.aggregate):.3f}")
            else:
                line += f" {rec.error}"
            if not self.quiet:
                (bar.write if bar is not None and not bar.disable else s.log)(line)
        else:
            n_done = len(study.get_trials(deepcopy=False, states=_finished()))
            s.log(
                f"stopped after {attempts} attempts with {n_done} complete trials: too many failures (see the error column)"
            )
        if bar is not None:
            bar.close()
        return n_done


def _finished() -> tuple[Any, ...]:
    """The trial states that count against the budget (optuna is imported lazily)."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def _counted() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (*_finished(), TrialState.RUNNING)


def _fail_quietly(study: Any, trial: Any, error: str) -> None:
    """Fail a trial that may be finished already (by its own handler, or another worker)."""
    from optuna.trial import TrialState

    try:
        rec = TrialRecord.from_dict(trial.user_attrs.get("result"))
        rec.error = rec.error or error
        StudyRecords.set_trial(trial, rec)
        study.tell(trial, state=TrialState.FAIL)
    except Exception:  # noqa: BLE001 - already finished: nothing to do
        pass


class _Finished(Exception):
    """The trial was finished by another worker (it found the trial's heartbeat stale)."""


def _tell(study: Any, trial: Any, values: Any = None, state: Any = None) -> None:
    try:
        study.tell(trial, values, state=state)
    except ValueError as e:
        if "Cannot tell a" in str(e):
            raise _Finished(str(e)) from None
        raise


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_search(space_file: str | Path, **kwargs: Any) -> SearchOutcome:
    """Run (or resume) the search of a space; see :class:`Search` for the arguments.

    Example:
        >>> out = run_search("search_spaces/demo.yml", trials=40)   # doctest: +SKIP
        >>> out.chosen["test"]                                       # doctest: +SKIP
    """
    return Search(space_file, **kwargs).run()

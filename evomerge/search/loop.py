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
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.contamination.rules import assessment_to_dict
from evomerge.errors import failure_line
from evomerge.evaluation.base import Evaluator
from evomerge.io import dump_yaml
from evomerge.search.baselines import run_baselines
from evomerge.search.candidates import Candidates
from evomerge.search.finalists import Holdout
from evomerge.search.records import StudyMeta, StudyRecords, TrialRecord
from evomerge.search.recovery import recover_dead_trials
from evomerge.search.samplers import make_sampler, suggester
from evomerge.search.setup import Setup, prepare
from evomerge.search.storage import StudyPaths
from evomerge.search.table import best_row, write_trials_csv
from evomerge.space import Directive

__all__ = ["Search", "SearchOutcome", "run_search"]


@dataclass
class SearchOutcome:
    """What a finished (or resumed-to-completion) search reports."""

    paths: StudyPaths
    n_complete: int
    n_failed: int
    best: Mapping[str, Any] | None
    baselines: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def _jsonable(x: Any) -> Any:
    if isinstance(x, Directive):
        return {"directive": x.kind, "name": x.name, "low": x.low, "high": x.high, "log": x.log, "step": x.step,
                "choices": list(x.choices), "anchors": x.anchors, "per_layers": x.per_layers}
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
            seed, results_dir, evaluator, log, threads).

    Raises:
        ConfigError / EvomergeError: anything wrong with the space, its models, its tasks or the
            storage (checked before anything is written).
    """

    def __init__(self, space_file: str | Path, *, probe: bool = False, quiet: bool = False, evaluator: Evaluator | None = None, **kwargs: Any) -> None:
        self.setup: Setup = prepare(space_file, evaluator=evaluator, **kwargs)
        self.quiet = quiet
        self.probe = probe
        self.candidates = Candidates(self.setup.merger, self.setup.evaluator)
        self._interrupted = False

    @property
    def paths(self) -> StudyPaths:
        return self.setup.paths

    # ------------------------------------------------------------------ the study
    def open_study(self) -> StudyRecords:
        """Create or load the study, record what readers need, and return its records."""
        import optuna

        s = self.setup
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = make_sampler(s.space.search.sampler, s.seed, s.trials, s.space.search.startup_trials, bool(s.objectives))
        kw: dict[str, Any] = {"directions": ["maximize"] * len(s.objectives)} if s.objectives else {"direction": "maximize"}
        study = optuna.create_study(study_name=s.paths.name, storage=s.storage, sampler=sampler, load_if_exists=True, **kw)
        records = StudyRecords(study)
        fingerprint = json.dumps({"tree": _jsonable(s.space.tree), "objectives": s.objectives}, sort_keys=True, default=str)
        old = records.meta().space
        if old is not None and old != fingerprint:
            s.log(f"warning: the space changed since study {s.paths.name!r} started; earlier trials keep their recipes (use --study NEW to start afresh)")
        include = getattr(getattr(s.evaluator, "cfg", None), "include_path", None)
        records.set_meta(StudyMeta(
            space=fingerprint, space_file=str(Path(s.file).resolve()), seed=s.mask_seed, model_refs=s.space.model_refs(),
            include_path=list(include) if include else None, search_tasks=s.search_tasks, holdout_tasks=s.holdout_tasks,
            flags=s.assessment.columns() if s.assessment is not None else {},
            assessment=assessment_to_dict(s.assessment) if s.assessment is not None else None,
        ))
        return records

    def _holdout(self, records: StudyRecords) -> Holdout:
        s = self.setup
        base = s.space.tree.get("base_model")
        base_dir = str(s.sources[base].path) if isinstance(base, str) and base in s.sources else None
        return Holdout(self.candidates, records, enabled=bool(s.holdout_tasks), finalists=s.space.search.finalists, probe=self.probe,
                       base_ref=base if isinstance(base, str) else None, base_dir=base_dir, tokenizer_dir=str(s.tokenizer_dir),
                       device=s.device, seed=s.seed, file=s.file, log=s.log)

    def run_trial(self, records: StudyRecords, holdout: Holdout, best: list[float]) -> tuple[str, int, TrialRecord]:
        """One ask -> materialize -> evaluate -> tell round. Returns (state, trial number, record)."""
        from optuna.trial import TrialState

        s, study = self.setup, records.study
        trial = study.ask()
        records.claim(trial)
        rec = TrialRecord()
        try:
            recipe = s.space.render(suggester(trial), s.layers_of)
            rec.method, rec.recipe = recipe.get("merge_method"), dump_yaml(recipe)
            t0 = time.perf_counter()
            model, res = self.candidates.materialize(recipe, f"{s.file} (trial {trial.number})")
            rec.merge_s, rec.digest = time.perf_counter() - t0, res.digest
            rec.search = self.candidates.score(model, "search")
            rec.eval_s = rec.search.seconds
        except KeyboardInterrupt:
            rec.error = "interrupted (Ctrl-C)"
            records.set_trial(trial, rec)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:  # any failure of one candidate fails that trial only
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            rec.error = failure_line(e)
            records.set_trial(trial, rec)
            study.tell(trial, state=TrialState.FAIL)
            return "FAIL", trial.number, rec
        records.set_trial(trial, rec)  # one write for everything the table needs (each is a commit)
        scores = rec.search
        study.tell(trial, [scores.scores[o] for o in s.objectives] if s.objectives else scores.aggregate)
        if scores.aggregate > best[0] or records.baseline_of(trial):
            best[0] = max(best[0], scores.aggregate)
            holdout.rescore(trial.number, model)  # every new best (and hand recipe) gets its holdout re-score now
        return "COMPLETE", trial.number, rec

    def run(self) -> SearchOutcome:
        """Run or resume the study to its budget; returns the outcome.

        Raises:
            KeyboardInterrupt: on Ctrl-C, after marking the running trial failed and writing the table.
        """
        # Remember Ctrl-C even if a library on the stack swallows the KeyboardInterrupt (a
        # database driver in the middle of a commit may): the loop re-raises it at the next step.
        self._interrupted = False
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.getsignal(signal.SIGINT)

            def on_sigint(signum: int, frame: Any) -> None:
                self._interrupted = True
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)
        try:
            return self._run()
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def _check_interrupt(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    def _run(self) -> SearchOutcome:
        from optuna.trial import TrialState

        s = self.setup
        start = time.perf_counter()
        if s.assessment is not None:
            for w in s.assessment.warnings():
                s.log(w)
        records = self.open_study()
        study = records.study
        dead = recover_dead_trials(records)
        if dead:
            s.log(f"resume: trial(s) {', '.join(map(str, dead))} were running when their process died: marked failed, parameters queued for one retry")
        holdout = self._holdout(records)
        try:
            run_baselines(s.space, s.baselines, self.candidates, records, layers_of=s.layers_of, holdout=bool(s.holdout_tasks),
                          log=s.log, check_interrupt=self._check_interrupt)
            write_trials_csv(study, s.paths.csv)
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            n_done = len(complete)
            if n_done:
                s.log(f"resume: {n_done} of {s.trials} trials already complete")
            best = [max((r.search.aggregate for r in map(records.trial, complete) if r.search is not None), default=-math.inf)]
            attempts = 0
            bar = None
            if not self.quiet and n_done < s.trials:
                from tqdm.auto import tqdm

                bar = tqdm(total=s.trials, initial=n_done, desc="trials", unit="trial", dynamic_ncols=True, file=sys.stderr)
            while n_done < s.trials and attempts < 3 * s.trials + 10:
                self._check_interrupt()
                attempts += 1
                state, number, rec = self.run_trial(records, holdout, best)
                write_trials_csv(study, s.paths.csv)
                self._check_interrupt()
                line = f"trial {number:>3} {state:8}"
                if state == "COMPLETE" and rec.search is not None:
                    n_done += 1
                    line += f" score {rec.search.aggregate:.3f}  merge {rec.merge_s or 0:.2f}s eval {rec.eval_s or 0:.2f}s  {rec.method or ''}"
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(best=f"{best[0]:.3f}")
                else:
                    line += f" {rec.error}"
                if not self.quiet:
                    (bar.write if bar is not None else s.log)(line)
            if bar is not None:
                bar.close()
            if n_done < s.trials:
                s.log(f"stopped after {attempts} attempts with {n_done} complete trials: too many failures (see the error column)")
            holdout.finalists(self._check_interrupt)
        except KeyboardInterrupt:
            write_trials_csv(study, s.paths.csv)
            raise
        df = write_trials_csv(study, s.paths.csv)
        best_r = best_row(df)
        baselines = {r["baseline"]: r for r in df[df["baseline"] != ""].to_dict("records")}
        n_fail = int((df["state"] == "FAIL").sum())
        return SearchOutcome(s.paths, n_done, n_fail, None if best_r is None else best_r.to_dict(), baselines, time.perf_counter() - start)


def run_search(space_file: str | Path, **kwargs: Any) -> SearchOutcome:
    """Run (or resume) the search of a space; see :class:`Search` for the arguments.

    Example:
        >>> out = run_search("search_spaces/demo.yml", trials=40)   # doctest: +SKIP
        >>> out.best["holdout"]                                      # doctest: +SKIP
    """
    return Search(space_file, **kwargs).run()


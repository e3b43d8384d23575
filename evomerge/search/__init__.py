"""The search: preparing it (:mod:`.setup`), the ask -> merge -> score -> tell loop (:mod:`.loop`),
baselines, holdout finalists, typed records in the Optuna storage (:mod:`.records`), where a study
lives (:mod:`.storage`) and its results table (:mod:`.table`). Several workers share one study:
once-per-study work under claims (:mod:`.claims`), heartbeats and slots (:mod:`.liveness`), dead
workers' trials failed and retried (:mod:`.recovery`), one worker process per device (:mod:`.workers`)."""

from evomerge.search.loop import Search, SearchOutcome, run_search
from evomerge.search.samplers import make_sampler
from evomerge.search.table import load_trials

__all__ = ["Search", "SearchOutcome", "run_search", "make_sampler", "load_trials"]

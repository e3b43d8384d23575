"""The search: preparing it (:mod:`.setup`), the ask -> merge -> score -> tell loop (:mod:`.loop`),
baselines, holdout finalists, recovery of dead trials, typed records in the Optuna storage
(:mod:`.records`), where a study lives (:mod:`.storage`) and its results table (:mod:`.table`)."""

from evomerge.search.loop import Search, SearchOutcome, run_search
from evomerge.search.samplers import make_sampler
from evomerge.search.table import load_trials

__all__ = ["Search", "SearchOutcome", "run_search", "make_sampler", "load_trials"]

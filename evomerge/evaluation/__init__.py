"""Scoring candidates: the evaluator interface and the one result type (:mod:`.base`), the
``evaluate:`` section (:mod:`.section`), lm-eval's task index (:mod:`.tasks`), the lm-eval
evaluator (:mod:`.lmeval`, with the LMs of :mod:`.hflm`, the shared-context scorer of
:mod:`.scorer` and the staged scoring of :mod:`.items`) and a fake evaluator for tests
(:mod:`.fake`). ``lm_eval`` is imported by :mod:`.hflm` (and so by :mod:`.lmeval` and
:mod:`.items`) only: this package's own import does not load it."""

from evomerge.evaluation.base import EvalConfig, Evaluator, Scores, TaskSpec
from evomerge.evaluation.fake import FakeEvaluator
from evomerge.evaluation.section import PRESETS, parse_evaluate
from evomerge.evaluation.tasks import task_manager

__all__ = [
    "EvalConfig",
    "Scores",
    "Evaluator",
    "TaskSpec",
    "FakeEvaluator",
    "task_manager",
    "PRESETS",
    "parse_evaluate",
]

"""Scoring candidates: the evaluator interface (:mod:`.base`), the ``evaluate:`` section
(:mod:`.section`), lm-eval (:mod:`.lmeval` and the shared-context scorer :mod:`.scorer`, the only modules that import
``lm_eval``) and a fake
evaluator for tests (:mod:`.fake`)."""

from evomerge.evaluation.base import EvalConfig, EvalResult, Evaluator, TaskSpec, aggregate
from evomerge.evaluation.fake import FakeEvaluator
from evomerge.evaluation.lmeval import LMEvalEvaluator, task_manager
from evomerge.evaluation.section import PRESETS, parse_evaluate

__all__ = [
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "TaskSpec",
    "aggregate",
    "FakeEvaluator",
    "LMEvalEvaluator",
    "task_manager",
    "PRESETS",
    "parse_evaluate",
]

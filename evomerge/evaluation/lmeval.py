"""The lm-evaluation-harness evaluator: :class:`LMEvalEvaluator` scores an in-memory model on a
split's items with lm-eval's own tasks, prompts, filters and metrics (the task index:
:mod:`.tasks`; the LM that runs the model: :mod:`.hflm`; scoring a subset of the items:
:mod:`.items`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from evomerge.compat import quiet_task_progress
from evomerge.errors import ConfigError, EvomergeError
from evomerge.evaluation.base import (
    SCORERS,
    EvalConfig,
    Evaluator,
    Scores,
    StagedEvaluation,
    TaskSpec,
    make_scores,
    say_once,
)
from evomerge.evaluation.genlm import check_generation_tasks
from evomerge.evaluation.hflm import make_lm, reseed_fewshot
from evomerge.evaluation.items import (
    LMEvalStaged,
    RequestBank,
    items_from_samples,
    metric_value,
    stageable,
)
from evomerge.evaluation.splits import Splits
from evomerge.evaluation.tasks import leaf_tasks, quiet_lm_eval

__all__ = ["LMEvalEvaluator"]

logger = logging.getLogger(__name__)


class LMEvalEvaluator(Splits, Evaluator):
    """lm-evaluation-harness over an in-memory model.

    Task objects, datasets and prompts are built once (:class:`~evomerge.evaluation.splits.Splits`,
    which also answers for the items: task names, texts, prompts, digest); each :meth:`evaluate`
    wraps the given model in a fresh lm-eval LM (no copy of the weights) and runs lm-eval on the
    prebuilt tasks with no response cache, so consecutive candidates never share answers.

    Args:
        cfg: the parsed ``evaluate:`` section.
        tokenizer: the tokenizer of every candidate (they share the base's vocabulary).
        device: where inputs go (the model must already live there).
        batch_size: overrides ``cfg.batch_size``.
        scorer: overrides ``cfg.scorer`` (one of :data:`~evomerge.evaluation.base.SCORERS`).
        max_length: the models' context length in tokens
            (:func:`~evomerge.evaluation.genlm.context_length`); None: generation budgets are not
            checked against it.

    Raises:
        ConfigError: a holdout range with no docs left after the search docs; a generation task
            whose ``max_gen_toks`` leaves no room for a prompt in ``max_length``; ``chat_template``
            asked for and the tokenizer has none.
        ValueError: an unknown ``scorer``.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer,
        *,
        device: str = "cpu",
        batch_size: int | None = None,
        scorer: str | None = None,
        max_length: int | None = None,
    ) -> None:
        quiet_lm_eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = int(batch_size or cfg.batch_size)
        self.scorer = scorer or cfg.scorer
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                cfg.file,
                "evaluate.chat_template",
                f"the tokenizer ({name}) has no chat template; set chat_template: false, "
                "or name a model whose tokenizer has one in tokenizer_source",
            )
        super().__init__(cfg)
        self._bank: RequestBank | None = None  # built on the first staged evaluation
        # The generation tasks' checks: errors stop here, notes are said once; the tasks whose
        # answers HFLM's path generates (and why) go to every LM.
        self._hflm_tasks: dict[str, str] = {}
        for split, where in (("search", "evaluate.tasks"), ("holdout", "evaluate.holdout.tasks")):
            if split not in self.dicts or (split == "holdout" and not cfg.holdout):
                continue  # a holdout of the search tasks' later items was checked as search
            found = check_generation_tasks(leaf_tasks(self.dicts[split]), max_length)
            for i, spec in enumerate(self.task_specs[split]):
                for leaf in self.leaves[split][spec.name]:
                    if leaf in found.errors:
                        raise ConfigError(cfg.file, f"{where}[{i}]", found.errors[leaf])
            for note in found.notes:
                say_once(note, note, log=logger, level=logging.WARNING)
            self._hflm_tasks |= found.hflm_tasks

    def include_path(self) -> list[str]:
        return list(self.cfg.include_path)

    def item_counts(self) -> dict[str, int]:
        """Search items per task, or ``{}`` when a metric is not a mean of per-item values."""
        if stageable(leaf_tasks(self.dicts["search"]), self.leaves["search"], self.specs()):
            return {}
        return self.counts("search")

    def specs(self) -> list[TaskSpec]:
        return list(self.task_specs["search"])

    def staged(self, model: torch.nn.Module) -> StagedEvaluation | None:
        """Score ``model`` on the search items in rounds (:mod:`evomerge.evaluation.items`); None
        when :meth:`item_counts` is empty."""
        if not self.item_counts():
            return None
        model.eval()
        lm = self._lm(model)
        if self._bank is None:
            self._bank = RequestBank(
                leaf_tasks(self.dicts["search"]),
                self.samples["search"],
                chat=lm if self.cfg.chat_template else None,
            )
        return LMEvalStaged(
            self._bank,
            self.task_specs["search"],
            self.leaves["search"],
            lm,
            lambda memo: self._run(model, memo, "search"),
        )

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> Scores:
        """Score ``model`` on the search or holdout items.

        Args:
            model: a ``transformers`` causal LM (in memory, on ``device``).
            split: one of :data:`~evomerge.evaluation.base.SPLITS`.

        Returns:
            The :class:`~evomerge.evaluation.base.Scores`; ``scores`` are fractions in [0, 1], ``values`` each task's
            per-item values.

        Raises:
            EvomergeError: ``split`` is "holdout" and the config has none; a metric missing from
                lm-eval's results.
        """
        if split not in self.dicts:
            zero = split == "validation" and "holdout" in self.dicts
            where = "evaluate.holdout" + (".validation is 0" if zero else "")
            raise EvomergeError(f"no {split} items configured ({where})")
        quiet_lm_eval()
        return self._run(model, self._lm(model), split)

    def _lm(self, model: torch.nn.Module) -> Any:
        return make_lm(
            model,
            self.tokenizer,
            scorer=self.scorer,
            batch_size=self.batch_size,
            device=self.device,
            hflm_tasks=self._hflm_tasks,
        )

    def _run(self, model: torch.nn.Module, lm: Any, split: str) -> Scores:
        from lm_eval.evaluator import evaluate as lm_evaluate

        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        # lm-eval's evaluate() draws few-shot examples from each task's generator where the previous
        # call left it: reseed, so that every candidate (and the staged scoring of
        # :class:`~evomerge.evaluation.items.RequestBank`) sees the same prompts.
        tasks = leaf_tasks(self.dicts[split])
        reseed_fewshot(tasks.values())
        with quiet_task_progress():
            out = lm_evaluate(
                lm,
                self.dicts[split],
                samples=self.samples[split],
                bootstrap_iters=100,  # mean metrics use the closed form; this bounds the others
                log_samples=True,  # per-item values (paired comparisons)
                verbosity="ERROR",
                apply_chat_template=self.cfg.chat_template,
                fewshot_as_multiturn=self.cfg.chat_template,
            )
        model.train(was_training)
        out = out or {}
        scores: dict[str, float] = {}
        stderr: dict[str, float] = {}
        items: dict[str, list[float | None]] = {}
        for spec in self.task_specs[split]:
            res = out.get("results", {}).get(spec.name, {})
            got = metric_value(res, spec.metric)
            if got is None:
                have = sorted({k.split(",")[0] for k in res if "," in k and "_stderr" not in k})
                raise EvomergeError(
                    f"task {spec.name!r} reports no metric {spec.metric!r} (it reports: {', '.join(have) or 'nothing'})"
                )
            scores[spec.name], stderr[spec.name] = got
            items[spec.name] = items_from_samples(
                out.get("samples", {}),
                spec,
                self.leaves[split][spec.name],
                self.samples[split],
                tasks,
            )
        return make_scores(self.task_specs[split], scores, stderr, time.perf_counter() - t0, items)

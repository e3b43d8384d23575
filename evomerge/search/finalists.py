"""The holdout: every new best, every hand recipe and, at the end, the top finalists are re-scored on
the holdout items (and probed for memorization when asked). Export takes the best holdout score.

Each trial is re-scored once across the study's workers (a claim ``holdout:<number>``, see
:mod:`evomerge.search.claims`). Every worker that stops re-scores the top ``finalists`` it sees; the
last one to stop sees every trial, so the study's final top ``finalists`` are all re-scored.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import yaml

from evomerge.contamination.probe import probe_contamination
from evomerge.search.candidates import Candidates
from evomerge.search.claims import Claims
from evomerge.search.records import Scores, StudyRecords

__all__ = ["Holdout"]

ModelOrMaker = torch.nn.Module | Callable[[], torch.nn.Module]


class Holdout:
    """Holdout re-scores (and the optional memorization probe) of a study's trials.

    Args:
        candidates: merges and scores.
        records: the study's records.
        claims: the study's claims.
        enabled: the space has holdout items.
        finalists: how many top trials :meth:`finalists` re-scores.
        probe: also run the Min-K%++ probe on every re-scored trial.
        base_ref, base_dir, tokenizer_dir: the space's base model (reference and directory) and
            tokenizer, for the probe.
        device, seed, file, log: the search's.
    """

    def __init__(
        self,
        candidates: Candidates,
        records: StudyRecords,
        claims: Claims,
        *,
        enabled: bool,
        finalists: int,
        probe: bool,
        base_ref: str | None,
        base_dir: str | None,
        tokenizer_dir: str,
        device: str,
        seed: int,
        file: str,
        log: Callable[[str], None],
    ) -> None:
        self.candidates, self.records, self.claims = candidates, records, claims
        self.enabled, self.n_finalists, self.probe = enabled, finalists, probe
        self.base_ref, self.base_dir, self.tokenizer_dir = base_ref, base_dir, tokenizer_dir
        self.device, self.seed, self.file, self.log = device, seed, file, log
        self._base_model: Any = None
        self._tokenizer: Any = None

    def rescore(
        self, number: int, model: ModelOrMaker, check_interrupt: Callable[[], None] = lambda: None
    ) -> Scores | None:
        """The holdout scores of trial ``number``, measured once across the study's workers.

        Args:
            number: the trial.
            model: the model holding the trial's merge, or a function that merges it (called only
                when this worker re-scores it).
            check_interrupt: raises KeyboardInterrupt once Ctrl-C was pressed (while waiting for
                another worker's re-score of the same trial).
        """
        if not self.enabled:
            return None

        def work() -> None:
            m = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
            self.records.set_holdout(number, self.candidates.score(m, "holdout"))
            if self.probe:
                self._probe(number, m)

        self.claims.run_once(
            f"holdout:{number}",
            done=lambda: self.records.refresh().holdout(number) is not None,
            work=work,
            check_interrupt=check_interrupt,
        )
        return self.records.holdout(number)

    def _probe(self, number: int, model: torch.nn.Module) -> None:
        if self.base_dir is None:
            self.records.set_probe(
                number,
                {
                    "memorization_probe": False,
                    "memorization_probe_evidence": "not run: the space has no base_model",
                },
            )
            return
        if self._base_model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            base: Any = AutoModelForCausalLM.from_pretrained(self.base_dir)
            self._base_model = base.to(self.device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        evaluator = self.candidates.evaluator
        texts = [x for v in evaluator.texts("search").values() for x in v]
        # Unseen items of the same distribution are the best controls (perturbed neighbours can
        # over-flag a merge that merely learned the skill): use the holdout items.
        controls = [x for v in evaluator.texts("holdout").values() for x in v]
        r = probe_contamination(
            model,
            self._base_model,
            self._tokenizer,
            texts,
            controls=controls or None,
            seed=self.seed,
        )
        self.records.set_probe(number, r.columns())

    def finalists(self, check_interrupt: Callable[[], None]) -> None:
        """Re-score the top ``finalists`` completed trials by search score on the holdout items."""
        from optuna.trial import TrialState

        if not self.n_finalists or not self.enabled:
            return
        study = self.records.study
        done = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            rec = self.records.trial(t)
            if rec.search is not None:
                done.append((rec.search.aggregate, t.number, rec))
        done.sort(key=lambda x: x[0], reverse=True)
        for _, number, rec in done[: self.n_finalists]:
            check_interrupt()
            self.rescore(number, partial(self._remerge, number, rec), check_interrupt)

    def _remerge(self, number: int, rec: Any) -> torch.nn.Module:
        model, res = self.candidates.materialize(
            yaml.safe_load(rec.recipe or "{}"), f"{self.file} (trial {number})"
        )
        if res.digest != rec.digest:
            self.log(
                f"warning: trial {number} re-merged to a different tensor hash ({res.digest[:12]} vs {str(rec.digest)[:12]})"
            )
        return model

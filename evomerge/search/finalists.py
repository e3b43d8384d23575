"""The holdout: validation items choose the trial a user gets, test items report its score.

- Every new best and every hand recipe is re-scored on the **validation** items as it finishes,
  and at the end the top ``finalists`` by search score are too (probed for memorization when
  asked). The chosen trial is the best validation score among them
  (:func:`~evomerge.search.table.chosen_row`; the best search score when the space has no
  validation items).
- The chosen trial, the hand recipes and the baselines are scored on the **test** items, which
  choose nothing: the chosen trial's test score is an unbiased estimate of what it scores on
  fresh items, and compares with the baselines' on the same items. A maximum over several
  candidates' scores would not be.

Each re-score runs once across the study's workers (a claim ``<split>:<number>``, see
:mod:`evomerge.search.distributed.claims`). Every worker that stops re-scores the top ``finalists`` it sees
and tests the trial it would choose; the last one to stop sees every trial, so the study's final
finalists and chosen trial are all scored.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import yaml

from evomerge.contamination.probe import probe_contamination
from evomerge.search.candidates import Candidates
from evomerge.search.distributed.coordinator import Coordinator
from evomerge.search.records import Scores, StudyRecords
from evomerge.search.setup import Setup
from evomerge.search.table import chosen_row, trials_frame

__all__ = ["Holdout"]

ModelOrMaker = torch.nn.Module | Callable[[], torch.nn.Module]


class Holdout:
    """Validation and test scores (and the optional memorization probe) of a study's trials.

    Args:
        candidates: merges and scores.
        records: the study's records.
        coordinator: runs each re-score in one worker of the study.
        splits: the holdout splits the space has: ``("validation", "test")``, ``("test",)``
            (validation share 0: the search score chooses) or ``()`` (no holdout).
        finalists: how many top trials by search score :meth:`finalists` re-scores.
        probe: also run the Min-K%++ probe on every trial re-scored on the validation items.
        base_ref, base_dir, tokenizer_dir: the space's base model (reference and directory) and
            tokenizer, for the probe.
        device, seed, file, log: the search's.
    """

    def __init__(
        self,
        candidates: Candidates,
        records: StudyRecords,
        coordinator: Coordinator,
        *,
        splits: tuple[str, ...],
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
        self.candidates, self.records, self.coordinator = candidates, records, coordinator
        self.splits, self.n_finalists, self.probe = splits, finalists, probe
        self.base_ref, self.base_dir, self.tokenizer_dir = base_ref, base_dir, tokenizer_dir
        self.device, self.seed, self.file, self.log = device, seed, file, log
        self._base_model: Any = None
        self._tokenizer: Any = None

    @classmethod
    def of(
        cls,
        setup: Setup,
        candidates: Candidates,
        records: StudyRecords,
        coordinator: Coordinator,
        probe: bool,
    ) -> Holdout:
        """The holdout of a prepared search."""
        base = setup.space.tree.get("base_model")
        src = setup.sources.get(base) if isinstance(base, str) else None
        return cls(
            candidates,
            records,
            coordinator,
            splits=setup.splits,
            finalists=setup.space.search.finalists,
            probe=probe,
            base_ref=base if isinstance(base, str) else None,
            base_dir=str(src.path) if src is not None else None,
            tokenizer_dir=str(setup.tokenizer_dir),
            device=setup.device,
            seed=setup.seed,
            file=setup.file,
            log=setup.log,
        )

    def rescore(
        self,
        number: int,
        model: ModelOrMaker,
        split: str = "validation",
        check_interrupt: Callable[[], None] = lambda: None,
    ) -> Scores | None:
        """Trial ``number``'s scores on ``split``, measured once across the study's workers
        (None when the space has no such items).

        Args:
            number: the trial.
            model: the model holding the trial's merge, or a function that merges it (called only
                when this worker re-scores it).
            split: "validation" or "test".
            check_interrupt: raises KeyboardInterrupt once Ctrl-C was pressed (while waiting for
                another worker's re-score of the same trial).
        """
        if split not in self.splits:
            return None

        def work() -> None:
            m = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
            self.records.set_rescore(number, split, self.candidates.score(m, split))
            if self.probe and split == "validation":
                self._probe(number, m)

        self.coordinator.once(
            f"{split}:{number}",
            done=lambda: self.records.refresh().rescore(number, split) is not None,
            work=work,
            check_interrupt=check_interrupt,
        )
        return self.records.rescore(number, split)

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
        """Re-score the top ``finalists`` completed trials by search score on the validation
        items, then score the chosen trial on the test items."""
        from optuna.trial import TrialState

        if self.n_finalists and "validation" in self.splits:
            done = []
            for t in self.records.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                rec = self.records.trial(t)
                if rec.search is not None:
                    done.append((rec.search.aggregate, t.number, rec))
            done.sort(key=lambda x: x[0], reverse=True)
            for _, number, rec in done[: self.n_finalists]:
                check_interrupt()
                self.rescore(
                    number, partial(self._remerge, number, rec), "validation", check_interrupt
                )
        self.test_chosen(check_interrupt)

    def test_chosen(self, check_interrupt: Callable[[], None]) -> int | None:
        """Score the chosen trial on the test items (once); returns its number (None: no
        searched trial completed)."""
        row = chosen_row(trials_frame(self.records.refresh().study))
        if row is None:
            return None
        number = int(row["number"])
        rec = self.records.trial(self.records.study.trials[number])
        self.rescore(number, partial(self._remerge, number, rec), "test", check_interrupt)
        return number

    def _remerge(self, number: int, rec: Any) -> torch.nn.Module:
        model, res = self.candidates.materialize(
            yaml.safe_load(rec.recipe or "{}"), f"{self.file} (trial {number})"
        )
        if res.digest != rec.digest:
            self.log(
                f"warning: trial {number} re-merged to a different tensor hash ({res.digest[:12]} vs {str(rec.digest)[:12]})"
            )
        return model

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

The baselines (:mod:`evomerge.search.baselines`) are scored on the search items and both holdout
splits. Each baseline and each re-score runs once across the study's workers (a claim
``baseline:<name>`` or ``<split>:<number>``, see :mod:`evomerge.search.distributed.claims`). Every worker that stops re-scores the top ``finalists`` it sees
and tests the trial it would choose; the last one to stop sees every trial, so the study's final
finalists and chosen trial are all scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import yaml
from optuna.trial import TrialState

from evomerge.contamination.probe import probe_contamination
from evomerge.errors import failure_line
from evomerge.io import dump_yaml
from evomerge.search.candidates import Candidates
from evomerge.search.distributed.coordinator import Coordinator
from evomerge.search.records import Scores, StudyRecords, TrialRecord
from evomerge.search.setup import Setup
from evomerge.search.table import chosen_row, trials_frame

__all__ = ["Holdout"]


class Holdout:
    """The baselines' scores, and validation and test scores (and the optional memorization
    probe) of a study's trials.

    Args:
        setup: the prepared search (its holdout splits: ``("validation", "test")``, ``("test",)``
            when the validation share is 0 and the search score chooses, or ``()``; its
            ``search.finalists``; its baselines; its base model and tokenizer, for the probe).
        candidates: merges and scores.
        records: the study's records.
        coordinator: runs each re-score in one worker of the study.
        probe: also run the Min-K%++ probe on every trial re-scored on the validation items.
    """

    def __init__(
        self,
        setup: Setup,
        candidates: Candidates,
        records: StudyRecords,
        coordinator: Coordinator,
        probe: bool,
    ) -> None:
        self.setup, self.candidates, self.records = setup, candidates, records
        self.coordinator, self.probe = coordinator, probe
        self._base_model: Any = None
        self._tokenizer: Any = None

    def baselines(self, *, wait: bool, check_interrupt: Callable[[], None]) -> None:
        """Score every baseline not scored yet (hand recipes queued as trials by
        :func:`~evomerge.search.baselines.enqueue_first_trials` are done already), each once
        across the study's workers.

        Args:
            wait: wait for baselines another worker is scoring (at the end of a search); False:
                leave them to it and return (at the start, so that every worker gets to work).
            check_interrupt: raises KeyboardInterrupt once Ctrl-C was pressed.
        """
        for name, recipe in self.setup.baselines.items():
            check_interrupt()
            text = dump_yaml(recipe)
            if not self._baseline_done(name, text) and self.records.baseline_done(name):
                self.setup.log(
                    f"baseline {name}: its recipe changed since it was scored; scoring it again"
                )
            self.coordinator.once(
                f"baseline:{name}",
                done=partial(self._baseline_done, name, text),
                work=partial(self._score_baseline, name, recipe),
                wait=wait,
                check_interrupt=check_interrupt,
            )

    def _baseline_done(self, name: str, recipe: str) -> bool:
        return self.records.refresh().baseline_done(name, recipe)

    def _score_baseline(self, name: str, recipe: dict[str, Any]) -> None:
        s, candidates = self.setup, self.candidates
        rec = TrialRecord(
            method=recipe.get("merge_method") or ("moe" if "experts" in recipe else None),
            recipe=dump_yaml(recipe),
        )
        try:
            t0 = time.perf_counter()
            model, res = candidates.materialize(recipe, f"{s.file} (baseline {name})")
            rec.merge_s, rec.digest = time.perf_counter() - t0, res.digest
            rec.search = candidates.score(model, "search")
            rec.eval_s = rec.search.seconds
            for split in s.splits:
                setattr(rec, split, candidates.score(model, split))
            rec.state = "COMPLETE"
            s.log(
                f"baseline {name:<28} search {rec.search.aggregate:.3f}"
                + "".join(f"  {k} {v.aggregate:.3f}" for k in s.splits if (v := getattr(rec, k)))
            )
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a baseline that cannot be merged or scored is reported, not fatal
            rec.state, rec.error = "FAIL", failure_line(e)
            s.log(f"baseline {name}: failed: {rec.error}")
        self.records.set_baseline(name, rec)

    def rescore(
        self,
        number: int,
        merged: Callable[[], torch.nn.Module],
        split: str = "validation",
        check_interrupt: Callable[[], None] = lambda: None,
    ) -> Scores | None:
        """Trial ``number``'s scores on ``split``, measured once across the study's workers
        (None when the space has no such items).

        Args:
            number: the trial.
            merged: returns the model holding the trial's merge (called only when this worker
                re-scores it).
            split: "validation" or "test".
            check_interrupt: raises KeyboardInterrupt once Ctrl-C was pressed (while waiting for
                another worker's re-score of the same trial).
        """
        if split not in self.setup.splits:
            return None

        def work() -> None:
            m = merged()
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
        s = self.setup
        base = s.space.tree.get("base_model")
        if not isinstance(base, str) or base not in s.sources:
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

            model_: Any = AutoModelForCausalLM.from_pretrained(str(s.sources[base].path))
            self._base_model = model_.to(s.device).eval()
            self._tokenizer = AutoTokenizer.from_pretrained(str(s.tokenizer_dir))
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
            seed=s.seed,
        )
        self.records.set_probe(number, r.columns())

    def finalists(self, check_interrupt: Callable[[], None]) -> None:
        """Re-score the top ``finalists`` completed trials by search score on the validation
        items, then score the chosen trial on the test items."""
        n = self.setup.space.search.finalists
        if n and "validation" in self.setup.splits:
            trials = self.records.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            done = [
                (r.search.aggregate, t.number)
                for t in trials
                if (r := self.records.trial(t)).search
            ]
            done.sort(key=lambda x: x[0], reverse=True)
            for _, number in done[:n]:
                check_interrupt()
                self.rescore(number, partial(self._remerge, number), "validation", check_interrupt)
        row = chosen_row(trials_frame(self.records.refresh().study))
        if row is not None:  # a searched trial completed
            number = int(row["number"])
            self.rescore(number, partial(self._remerge, number), "test", check_interrupt)

    def _remerge(self, number: int) -> torch.nn.Module:
        rec = self.records.trial(self.records.study.trials[number])
        model, res = self.candidates.materialize(
            yaml.safe_load(rec.recipe or "{}"), f"{self.setup.file} (trial {number})"
        )
        if res.digest != rec.digest:
            self.setup.log(
                f"warning: trial {number} re-merged to a different tensor hash ({res.digest[:12]} vs {str(rec.digest)[:12]})"
            )
        return model

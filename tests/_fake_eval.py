"""A deterministic stand-in for lm-eval in search tests: each "task" scores how much of one
fine-tune's task vector a merged model carries (projection onto ``ft - base``, clipped to
[-1, 1]). It depends on the merged tensors only, so it rewards exactly what a good merge does
(keep every expert's delta) and is cheap enough for dozens of trials per test.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from evomerge.evaluation.base import EvalResult, Evaluator, digest_of


class TaskVectorEvaluator(Evaluator):
    """Scores ``task_<i>`` = projection of (model - base) on (ft_i - base) / |ft_i - base|^2.

    Args:
        base, finetunes: model directories.
        holdout_scale: validation scores are search scores times this (1.0: no search/holdout gap).
        test_scale: test scores are search scores times this (default: ``holdout_scale``).
        validation: the holdout has validation items (False: only test items, as with
            ``evaluate.holdout.validation: 0``).
        sleep: seconds to wait per evaluation (to catch a search mid-trial in resume tests).
        marker: a file that exists while a search-split evaluation is running.
        fail_if: a predicate on the model; when true, evaluation raises (a broken candidate).
    """

    def __init__(
        self,
        base: Path,
        finetunes: list[Path],
        *,
        holdout_scale: float = 0.95,
        test_scale: float | None = None,
        validation: bool = True,
        sleep: float = 0.0,
        fail_if=None,
        marker: str | None = None,
    ) -> None:
        self.base = load_file(str(Path(base) / "model.safetensors"))
        self.fts = [load_file(str(Path(f) / "model.safetensors")) for f in finetunes]
        self.holdout_scale = holdout_scale
        self.test_scale = holdout_scale if test_scale is None else test_scale
        self.validation = validation
        self.finetunes = [str(f) for f in finetunes]
        self.sleep = sleep
        self.fail_if = fail_if
        self.calls = 0
        self.marker = Path(marker) if marker else None

    def task_names(self, split: str = "search") -> list[str]:
        if split == "validation" and not self.validation:
            return []
        return [f"{'task' if split == 'search' else 'holdout'}_{i}" for i in range(len(self.fts))]

    def digest(self) -> str:
        return digest_of([self.holdout_scale, self.test_scale, self.validation, self.finetunes])

    def texts(self, split: str = "search") -> dict:
        return {}

    def evaluate(self, model: torch.nn.Module, split: str = "search") -> EvalResult:
        from evomerge.errors import EvomergeError

        self.calls += 1
        start = time.perf_counter()
        if self.marker is not None and split == "search":
            self.marker.write_text(str(self.calls))  # "a search evaluation is in progress"
        if self.sleep:
            time.sleep(self.sleep)
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
        if self.fail_if is not None and self.fail_if(model):
            raise EvomergeError("evaluation failed: the fake evaluator rejects this model")
        sd = {k: v.detach().float() for k, v in model.state_dict().items()}
        scores = {}
        for name, ft in zip(self.task_names(split), self.fts, strict=False):
            num = sum(
                float(((sd[k] - self.base[k]) * (ft[k] - self.base[k])).sum())
                for k in ft
                if k in sd
            )
            den = sum(float(((ft[k] - self.base[k]) ** 2).sum()) for k in ft)
            s = max(-1.0, min(1.0, num / den))
            scale = {"search": 1.0, "test": self.test_scale}.get(split, self.holdout_scale)
            scores[name] = s * scale
        agg = sum(scores.values()) / len(scores)
        se = {k: 0.01 for k in scores}
        return EvalResult(
            scores, se, agg, 0.01 / len(scores) ** 0.5, time.perf_counter() - start, {}, {}
        )

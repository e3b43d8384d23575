"""The search tests' evaluator: evomerge's :class:`~evomerge.evaluation.fake.FakeEvaluator` where
task ``<i>`` scores how much of fine-tune ``i``'s task vector a merged model carries (projection
onto ``ft - base``, clipped to [-1, 1]). It depends on the merged tensors only, so it rewards
exactly what a good merge does (keep every expert's delta) and is cheap enough for dozens of
trials per test.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.evaluation.fake import FakeEvaluator


class TaskVectorEvaluator(FakeEvaluator):
    """Scores ``task_<i>`` = projection of (model - base) on (ft_i - base) / |ft_i - base|^2.

    Args:
        base, finetunes: model directories.
        holdout_scale: validation scores are search scores times this (1.0: no search/holdout gap).
        test_scale: test scores are search scores times this (default: ``holdout_scale``).
        validation: the holdout has validation items (False: only test items, as with
            ``evaluate.holdout.validation: 0``).
        sleep: seconds to wait per evaluation (to catch a search mid-trial in resume tests).
        fail_if: a predicate on the model; when true, evaluation raises (a broken candidate).
        marker: a file that exists while a search-split evaluation is running.
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
        self.scale = {"search": 1.0, "test": holdout_scale if test_scale is None else test_scale}
        self.holdout_scale, self.sleep, self.fail_if = holdout_scale, sleep, fail_if
        self.marker = Path(marker) if marker else None
        super().__init__(
            [f"task_{i}" for i in range(len(self.fts))],
            self._score,
            validation=0.5 if validation else 0.0,
            before=self._before,
            fingerprint=[holdout_scale, test_scale, [str(f) for f in finetunes]],
        )

    def _score(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        sd = {k: v.detach().float() for k, v in model.state_dict().items()}
        out = {}
        for name, ft in zip(self.tasks, self.fts, strict=True):
            num = sum(
                float(((sd[k] - self.base[k]) * (ft[k] - self.base[k])).sum())
                for k in ft
                if k in sd
            )
            den = sum(float(((ft[k] - self.base[k]) ** 2).sum()) for k in ft)
            out[name] = max(-1.0, min(1.0, num / den)) * self.scale.get(split, self.holdout_scale)
        return out

    def _before(self, model: torch.nn.Module, split: str) -> None:
        if self.marker is not None and split == "search":
            self.marker.write_text(str(self.calls))  # "a search evaluation is in progress"
        if self.sleep:
            time.sleep(self.sleep)
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
        if self.fail_if is not None and self.fail_if(model):
            raise EvomergeError("evaluation failed: the fake evaluator rejects this model")

"""Executing a merge plan: to disk (``evomerge merge``) or into a resident model (the search).

:class:`Merger` holds the opened sources, the device and the seed. ``execute`` runs a plan tensor
by tensor and hands each merged tensor to a sink; the two public paths differ only in the sink:

- :func:`merge_to_disk` streams tensors into safetensors shards inside a temp directory, adds
  config, tokenizer, recipe and model card, and renames the directory into place;
- :meth:`Merger.merge_into` copies each tensor into the matching parameter of a model that stays
  in memory (CPU or CUDA), so a search trial never touches the disk. With ``resident=True`` the
  merger also keeps source tensors on the device and caches per-source work (task vectors, sorted
  magnitudes, random fields) across trials.

Both paths hash the merged tensors the same ways: a sha256 of the bytes (:func:`tensors_digest`),
or a fingerprint computed on the tensors' device (:mod:`evomerge.engine.hashes`, what the
search records per trial on CUDA, where copying every tensor to the CPU for sha256 cost more
than the merge). Either can be checked against ``evomerge merge`` of the exported recipe.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import torch_dtype
from evomerge.engine.card import TOKENIZER_FILES, write_metadata
from evomerge.engine.hashes import Fingerprint, digest_model_dir, tensor_digest, tensors_digest
from evomerge.engine.inputs import PrepCache, TensorInputs
from evomerge.engine.kernels.methods import KERNELS
from evomerge.engine.placement import (
    Placement,
    SourceTensors,
    budget_override,
    cache_budget,
    check_device,
    place_sources,
)
from evomerge.engine.plan import MergePlan, TensorTask, make_plan
from evomerge.engine.resident import build_model, checkpoint_targets, copy_into
from evomerge.engine.rng import STREAM, check_stream
from evomerge.engine.sources import ModelSource, open_missing, open_sources
from evomerge.engine.writer import AtomicDir, ShardedWriter, parse_size
from evomerge.errors import EvomergeError, one_line
from evomerge.recipe.schema import MergeConfig, load_recipe

__all__ = [
    "Merger",
    "MergeResult",
    "merge_to_disk",
    "merge_in_memory",
    "tensor_digest",
    "tensors_digest",
    "digest_model_dir",
    "check_device",
    "TOKENIZER_FILES",
]


class MergeError(EvomergeError):
    """A merge failed on a tensor (NaN/inf, or a method's own precondition)."""


@dataclass
class MergeResult:
    """What a merge did: the digest of its tensors and where the time went."""

    digest: str
    seconds: float
    n_tensors: int
    bytes_out: int
    bytes_in: int
    out_dir: Path | None = None
    per_tensor: dict[str, str] = field(default_factory=dict, repr=False)
    fingerprint: str = ""  # set when asked for: the device-side fingerprint (``fp1-...``)


def _digest_kind(digest: str, device: torch.device) -> str:
    """What a merger's digest holds: ``digest``, with ``"auto"`` the fingerprint on CUDA, sha256
    elsewhere."""
    if digest not in ("auto", "sha256", "fingerprint"):
        raise ValueError(f"digest must be auto, sha256 or fingerprint, got {digest!r}")
    if digest == "auto":
        return "fingerprint" if device.type == "cuda" else "sha256"
    return digest


def _fits(
    targets: Mapping[str, torch.Tensor] | None,
    task: TensorTask,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The target a fused kernel may write ``task``'s output into: same shape, dtype and device,
    contiguous; else None."""
    dst = targets.get(task.out_name) if targets is not None else None
    if dst is None or dst.dtype != dtype or dst.device != device or not dst.is_contiguous():
        return None
    return dst if tuple(dst.shape) == tuple(task.shape) else None


class _Digests:
    """The digests one merge computes: sha256 per tensor, and/or the device-side fingerprint.

    ``digest`` asks for the merger's digest kind (the fingerprint when ``by_fingerprint``, else
    sha256); ``fingerprint`` asks for the fingerprint as well.
    """

    def __init__(self, digest: bool, by_fingerprint: bool, fingerprint: bool) -> None:
        self.by_fingerprint = digest and by_fingerprint
        self.by_sha = digest and not by_fingerprint
        self.fp = Fingerprint() if self.by_fingerprint or fingerprint else None
        self.per: dict[str, str] = {}

    def sha(self, name: str, out: torch.Tensor) -> None:
        if self.by_sha:
            self.per[name] = tensor_digest(out)

    def fingerprint(self, name: str, out: torch.Tensor) -> None:
        if self.fp is not None:
            self.fp.add(name, out)

    def result(self, shapes: Mapping[str, Any]) -> tuple[str, str]:
        """``(digest, fingerprint)``: the digest asked for ("" if none) and the fingerprint ("")."""
        fp_hex = self.fp.hexdigest() if self.fp is not None else ""
        if self.by_fingerprint:
            return fp_hex, fp_hex
        return (tensors_digest(self.per, shapes) if self.by_sha else ""), fp_hex


class Merger:
    """Runs merge plans over a set of opened models.

    Args:
        sources: opened models by reference (see :func:`~evomerge.engine.sources.open_sources`).
        device: where the math runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        seed: seeds every random mask (with the tensor name and input position).
        resident: keep source tensors on ``device`` between merges and cache per-source work
            (for the search, which merges the same sources again and again).
        cache_bytes: budget for that cache; default: a quarter of the memory on a CPU, on a GPU
            what the placement leaves spare (the sources, the model and evaluation come first).
        allow_crimes: plan merges across architectures when shapes match.
        compile: use compiled kernels (``torch.compile``) for large tensors; default: when
            ``resident``, where the compile time (seconds) is paid back over many merges.
        stream: the random stream of masks (:data:`~evomerge.engine.rng.STREAMS`; default the current).
        digest: what :attr:`MergeResult.digest` holds: ``"sha256"`` (bytes copied to the CPU),
            ``"fingerprint"`` (computed on the device, :class:`~evomerge.engine.hashes.Fingerprint`), or
            ``"auto"``: the fingerprint on CUDA, sha256 on CPU (where sha256 is twice as fast).
        gpu_memory: device memory the resident merger may plan for (``"60GB"``, bytes); default:
            ``$EVOMERGE_GPU_MEMORY``, else the free memory (see :mod:`~evomerge.engine.placement`).
        hold: resident sources in their ``"stored"`` dtype (default) or converted to the
            ``"compute"`` dtype (float32: twice the memory; for measuring the difference).

    Example:
        >>> merger = Merger(open_sources([...]), resident=True)            # doctest: +SKIP
        >>> plan = merger.plan(load_recipe("recipe.yml"))                  # doctest: +SKIP
        >>> model = merger.build_model(plan); merger.merge_into(model, plan)  # doctest: +SKIP
    """

    def __init__(
        self,
        sources: dict[str, ModelSource],
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        resident: bool = False,
        cache_bytes: int | None = None,
        allow_crimes: bool = False,
        compile: bool | None = None,
        stream: int = STREAM,
        digest: str = "auto",
        gpu_memory: str | int | None = None,
        hold: str = "stored",
    ) -> None:
        self.sources = sources
        self.stream = check_stream(stream)
        self.device = check_device(device)
        self.digest_kind = _digest_kind(digest, self.device)
        self.seed = seed
        self.resident = resident
        self.allow_crimes = allow_crimes
        self.compile = resident if compile is None else compile
        if hold not in ("stored", "compute"):
            raise ValueError(f"hold must be stored or compute, got {hold!r}")
        self.hold = hold
        override = budget_override(gpu_memory)
        self.placement: Placement | None = (
            place_sources(sources, self.device, hold=hold, override=override) if resident else None
        )
        if cache_bytes is None:
            cache_bytes = cache_budget(self.device, self.placement) if resident else 0
        self.cache = PrepCache(cache_bytes) if resident and cache_bytes > 0 else None
        self.tensors = SourceTensors(self.sources, self.device, self.placement, hold)
        self._targets: dict[int, dict[str, torch.Tensor]] = {}

    def plan(self, cfg: MergeConfig) -> MergePlan:
        """Plan ``cfg`` over this merger's sources (opening any model it does not have yet)."""
        open_missing(self.sources, cfg.referenced_models(), file=cfg.source_file)
        return make_plan(cfg, self.sources, allow_crimes=self.allow_crimes)

    def _merge_task(
        self, plan: MergePlan, task: TensorTask, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        compute = torch_dtype(plan.compute_dtype)
        tensors = [self.tensors.get(ref, name, compute) for ref, name in task.inputs]
        keys: list[Hashable] = list(task.inputs)
        inp = TensorInputs(
            task.out_name,
            tensors,
            keys,
            task.base,
            task.shared,
            list(task.per_input),
            self.seed,
            self.cache,
            compute_dtype=compute,
            out_dtype=torch_dtype(plan.out_dtype),
            decision_dtype=torch_dtype(task.decision_dtype),
            out=out,
            compiled=self.compile,
            stream=self.stream,
        )
        try:
            result = KERNELS[plan.recipe.method.name](inp)
        except ValueError as e:
            raise MergeError(f"tensor {task.out_name}: {one_line(e)}") from None
        # Fused kernels check their output chunk by chunk (a whole-tensor isfinite costs more than a linear merge).
        finite = inp.finite if inp.finite is not None else bool(torch.isfinite(result).all())
        if not finite:
            raise MergeError(
                f"merged tensor {task.out_name} has NaN or inf values ({plan.recipe.merge_method}, inputs: {', '.join(r for r, _ in task.inputs)})"
            )
        return result

    def execute(
        self,
        plan: MergePlan,
        sink: Callable[[str, torch.Tensor], None],
        *,
        digest: bool = True,
        targets: Mapping[str, torch.Tensor] | None = None,
        fingerprint: bool = False,
    ) -> MergeResult:
        """Merge every tensor of ``plan`` in order and hand each (cast to the output dtype) to ``sink``.

        Args:
            plan: the plan.
            sink: receives ``(name, tensor)`` for each output tensor, in plan order.
            digest: hash the merged tensors (the merger's digest kind) into ``MergeResult.digest``.
            fingerprint: also fill ``MergeResult.fingerprint``.
            targets: optional destination tensors by name; fused kernels write straight into a
                matching one (same shape, dtype, device, contiguous), and ``sink`` then receives it.

        Raises:
            MergeError: a merged tensor is not finite, or a method rejects its inputs.
        """
        start = time.perf_counter()
        out_dtype = torch_dtype(plan.out_dtype)
        digests = _Digests(digest, self.digest_kind == "fingerprint", fingerprint)
        bytes_out = bytes_in = 0

        def book(name: str, out: torch.Tensor) -> None:
            sink(name, out)
            digests.sha(name, out)

        # Streaming to disk, the sink (a file write) and sha256 (both release the GIL) run in a
        # second thread while the next tensor merges; at most two tensors wait, in plan order.
        # In memory the targets are the model's own tensors: no overlap.
        pool = (
            ThreadPoolExecutor(1, thread_name_prefix="evomerge-write")
            if targets is None and self.device.type == "cpu"
            else None
        )
        pending: deque[Future[None]] = deque()
        try:
            with torch.no_grad():
                for task in plan.tasks:
                    dst = _fits(targets, task, out_dtype, self.device)
                    out = self._merge_task(plan, task, dst).to(out_dtype)
                    if pool is None:
                        book(task.out_name, out)
                    else:
                        while len(pending) >= 2:
                            pending.popleft().result()
                        pending.append(pool.submit(book, task.out_name, out))
                    digests.fingerprint(task.out_name, out)
                    bytes_out += out.numel() * out.element_size()
                    bytes_in += sum(self.sources[r].nbytes(n) for r, n in task.inputs)
            while pending:
                pending.popleft().result()  # raises what the sink raised
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        value, fp_hex = digests.result({t.out_name: t.shape for t in plan.tasks})
        return MergeResult(
            value,
            time.perf_counter() - start,
            len(plan.tasks),
            bytes_out,
            bytes_in,
            per_tensor=digests.per,
            fingerprint=fp_hex,
        )

    def build_model(self, plan: MergePlan) -> torch.nn.Module:
        """A ``transformers`` model shaped like the plan's output, on this device, weights unset.

        Raises:
            EvomergeError: transformers does not know the architecture.
        """
        return build_model(plan.out_config, plan.out_dtype, self.device)

    def merge_into(
        self, model: torch.nn.Module, plan: MergePlan, *, digest: bool = True
    ) -> MergeResult:
        """Write the plan's merged tensors into ``model``'s parameters, in place.

        Raises:
            EvomergeError: the model has no parameter for some output tensor (built for another plan).
            MergeError: as :meth:`execute`.
        """
        targets = self._targets.get(id(model))
        if targets is None:
            targets = checkpoint_targets(model, [t.out_name for t in plan.tasks])
            self._targets = {id(model): targets}
        missing = [t.out_name for t in plan.tasks if t.out_name not in targets]
        if missing:
            raise EvomergeError(
                f"in-memory merge: the model has no tensor {missing[0]} (it was built for another layout)"
            )

        return self.execute(
            plan, copy_into(targets), digest=digest, targets={n: t.data for n, t in targets.items()}
        )


def merge_in_memory(
    recipe: MergeConfig | Mapping[str, Any] | str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_crimes: bool = False,
) -> torch.nn.Module:
    """Merge a recipe into a new in-memory ``transformers`` model (no disk writes).

    Args:
        recipe: a recipe file, mapping or :class:`MergeConfig`.
        device: where the model lives.
        seed: seed for random masks.

    Returns:
        The merged model, in eval mode, with ``model.evomerge_digest`` set to its tensor hash.
    """
    cfg = recipe if isinstance(recipe, MergeConfig) else load_recipe(recipe)
    merger = Merger(
        open_sources(cfg.referenced_models(), file=cfg.source_file),
        device=device,
        seed=seed,
        allow_crimes=allow_crimes,
    )
    plan = merger.plan(cfg)
    model = merger.build_model(plan)
    result = merger.merge_into(model, plan)
    model.evomerge_digest = result.digest  # type: ignore[assignment]
    return model


def merge_to_disk(
    recipe: MergeConfig | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    shard_size: str | int = "5GB",
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    allow_bin: bool = False,
    force: bool = False,
    card_extra: str = "",
    recipe_text: str | None = None,
    stream: int = STREAM,
    fingerprint: bool = False,
) -> MergeResult:
    """Merge a recipe into a Hugging Face model directory, atomically.

    Args:
        recipe: a recipe file, mapping or :class:`MergeConfig`.
        out_dir: the output directory (must be absent or empty unless ``force``).
        device: where the math runs.
        seed: seed for random masks.
        shard_size: maximum shard size (``"2GB"``, ``"500M"`` or bytes).
        copy_tokenizer: copy tokenizer files from the tokenizer source (base model by default).
        allow_crimes: merge across architectures when tensor shapes match.
        allow_bin: read ``.bin`` checkpoints (``weights_only=True``).
        force: replace an existing non-empty ``out_dir``.
        card_extra: markdown appended to the model card (e.g. the search's evaluation section).
        recipe_text: the text saved as ``mergekit_config.yml`` (default: the recipe as YAML).
        stream: the random stream of masks (an exported recipe's seed comment names it).
        fingerprint: also compute the device-side fingerprint (``MergeResult.fingerprint``).

    Returns:
        A :class:`MergeResult` with the tensor digest and timings.

    Raises:
        ConfigError / EvomergeError: bad recipe, missing model, non-empty output, NaN/inf output.
    """
    # Every check that needs no tensor comes first; nothing is created before the output's temp dir.
    cfg = recipe if isinstance(recipe, MergeConfig) else load_recipe(recipe)
    max_shard = parse_size(shard_size)
    check_device(device)
    atomic = AtomicDir(
        out_dir, force=force
    )  # refuses a non-empty or unwritable target, creates nothing
    sources = open_sources(cfg.referenced_models(), file=cfg.source_file, allow_bin=allow_bin)
    merger = Merger(sources, device=device, seed=seed, allow_crimes=allow_crimes, stream=stream)
    plan = merger.plan(cfg)
    out_dtype = torch_dtype(plan.out_dtype)
    try:
        with atomic:  # removes its temp dir on any error below
            writer = ShardedWriter(
                atomic.path, [(t.out_name, t.shape, out_dtype) for t in plan.tasks], max_shard
            )
            try:
                result = merger.execute(plan, writer.write, fingerprint=fingerprint)
                writer.close()
            finally:
                writer.abort()
            write_metadata(atomic.path, plan, sources, copy_tokenizer, recipe_text, card_extra)
    except MergeError as e:
        raise MergeError(f"{cfg.source_file}: {e}" if cfg.source_file else str(e)) from None
    except OSError as e:  # disk full, a permission changed mid-merge...
        raise EvomergeError(
            f"output {out_dir}: cannot write the merged model: {one_line(e.strerror or e)}"
        ) from None
    result.out_dir = Path(out_dir)
    return result

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
or a fingerprint computed on the tensors' device (:mod:`evomerge.engine.fingerprint`, what the
search records per trial on CUDA, where copying every tensor to the CPU for sha256 cost more
than the merge). Either can be checked against ``evomerge merge`` of the exported recipe.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import torch_dtype
from evomerge.engine.card import render_card
from evomerge.engine.hashes import Fingerprint, digest_model_dir, tensor_digest, tensors_digest
from evomerge.engine.inputs import PrepCache, TensorInputs
from evomerge.engine.kernels.methods import kernel_for
from evomerge.engine.plan import MergePlan, TensorTask, make_plan
from evomerge.engine.resident import build_model, checkpoint_targets
from evomerge.engine.rng import STREAM, check_stream
from evomerge.engine.sources import ModelSource, open_sources, resolve_model
from evomerge.engine.writer import AtomicDir, ShardedWriter, parse_size
from evomerge.errors import EvomergeError, one_line
from evomerge.io import dump_yaml
from evomerge.recipe.schema import MergeConfig, load_recipe

__all__ = ["Merger", "MergeResult", "merge_to_disk", "merge_in_memory", "tensor_digest", "tensors_digest", "digest_model_dir", "check_device", "TOKENIZER_FILES"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
)
TOKENIZER_FILES = _TOKENIZER_FILES  # the files a merged model's tokenizer is copied from


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


class Merger:
    """Runs merge plans over a set of opened models.

    Args:
        sources: opened models by reference (see :func:`~evomerge.engine.sources.open_sources`).
        device: where the math runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        seed: seeds every random mask (with the tensor name and input position).
        resident: keep source tensors on ``device`` between merges and cache per-source work
            (for the search, which merges the same sources again and again).
        cache_bytes: budget for that cache; default: a quarter of the device memory.
        allow_crimes: plan merges across architectures when shapes match.
        compile: use compiled kernels (``torch.compile``) for large tensors; default: when
            ``resident``, where the compile time (seconds) is paid back over many merges.
        stream: the random stream of masks (:data:`~evomerge.engine.rng.STREAMS`; default the current).
        digest: what :attr:`MergeResult.digest` holds: ``"sha256"`` (bytes copied to the CPU),
            ``"fingerprint"`` (computed on the device, :mod:`~evomerge.engine.fingerprint`), or
            ``"auto"``: the fingerprint on CUDA, sha256 on CPU (where sha256 is twice as fast).

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
    ) -> None:
        self.sources = sources
        if digest not in ("auto", "sha256", "fingerprint"):
            raise ValueError(f"digest must be auto, sha256 or fingerprint, got {digest!r}")
        self.stream = check_stream(stream)
        self.device = check_device(device)
        self.digest_kind = ("fingerprint" if self.device.type == "cuda" else "sha256") if digest == "auto" else digest
        self.seed = seed
        self.resident = resident
        self.allow_crimes = allow_crimes
        self.compile = resident if compile is None else compile
        if cache_bytes is None:
            cache_bytes = _device_memory(self.device) // 4 if resident else 0
        self.cache = PrepCache(cache_bytes) if resident and cache_bytes > 0 else None
        self._resident: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        self._targets: dict[int, dict[str, torch.Tensor]] = {}

    def plan(self, cfg: MergeConfig) -> MergePlan:
        """Plan ``cfg`` over this merger's sources (opening any model it does not have yet)."""
        missing = [r for r in cfg.referenced_models() if r not in self.sources]
        if missing:
            self.sources.update(open_sources(missing, file=cfg.source_file))
        return make_plan(cfg, self.sources, allow_crimes=self.allow_crimes)

    def _load(self, ref: str, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self.resident:
            key = (ref, name, dtype)
            t = self._resident.get(key)
            if t is None:
                t = self.sources[ref].get(name).to(self.device, dtype)
                self._resident[key] = t
            return t
        # Streaming: keep the stored dtype (a memory map on CPU); kernels convert chunk by chunk.
        t = self.sources[ref].get(name)
        if not t.is_floating_point():
            return t.to(self.device, dtype)
        return t.to(self.device)

    def _merge_task(self, plan: MergePlan, task: TensorTask, out: torch.Tensor | None = None) -> torch.Tensor:
        compute = torch_dtype(plan.compute_dtype)
        tensors = [self._load(ref, name, compute) for ref, name in task.inputs]
        keys: list[Hashable] = list(task.inputs)
        inp = TensorInputs(
            task.out_name, tensors, keys, task.base, task.shared, list(task.per_input), self.seed, self.cache,
            compute_dtype=compute, out_dtype=torch_dtype(plan.out_dtype), out=out, compiled=self.compile, stream=self.stream,
        )
        try:
            result = kernel_for(plan.recipe.method)(inp)
        except ValueError as e:
            raise MergeError(f"tensor {task.out_name}: {one_line(e)}") from None
        # Fused kernels check their output chunk by chunk (a whole-tensor isfinite costs more than a linear merge).
        finite = inp.finite if inp.finite is not None else bool(torch.isfinite(result).all())
        if not finite:
            raise MergeError(f"merged tensor {task.out_name} has NaN or inf values ({plan.recipe.merge_method}, inputs: {', '.join(r for r, _ in task.inputs)})")
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
        per: dict[str, str] = {}
        fp_kind = digest and self.digest_kind == "fingerprint"
        fp = Fingerprint() if fp_kind or fingerprint else None
        sha = digest and not fp_kind
        bytes_out = bytes_in = 0
        with torch.no_grad():
            for task in plan.tasks:
                dst = targets.get(task.out_name) if targets is not None else None
                if dst is not None and not (dst.dtype == out_dtype and dst.device == self.device and tuple(dst.shape) == tuple(task.shape) and dst.is_contiguous()):
                    dst = None
                out = self._merge_task(plan, task, dst).to(out_dtype)
                sink(task.out_name, out)
                if sha:
                    per[task.out_name] = tensor_digest(out)
                if fp is not None:
                    fp.add(task.out_name, out)
                bytes_out += out.numel() * out.element_size()
                bytes_in += sum(self.sources[r].nbytes(n) for r, n in task.inputs)
        shapes = {t.out_name: t.shape for t in plan.tasks}
        fp_hex = fp.hexdigest() if fp is not None else ""
        value = fp_hex if fp_kind else tensors_digest(per, shapes) if sha else ""
        return MergeResult(value, time.perf_counter() - start, len(plan.tasks), bytes_out, bytes_in, per_tensor=per, fingerprint=fp_hex)

    def build_model(self, plan: MergePlan) -> torch.nn.Module:
        """A ``transformers`` model shaped like the plan's output, on this device, weights unset.

        Raises:
            EvomergeError: transformers does not know the architecture.
        """
        return build_model(plan.out_config, plan.out_dtype, self.device)

    def merge_into(self, model: torch.nn.Module, plan: MergePlan, *, digest: bool = True) -> MergeResult:
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
            raise EvomergeError(f"in-memory merge: the model has no tensor {missing[0]} (it was built for another layout)")

        def sink(name: str, tensor: torch.Tensor) -> None:
            dst = targets[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise EvomergeError(f"in-memory merge: {name} is {list(tensor.shape)} but the model holds {list(dst.shape)}")
            if tensor.data_ptr() != dst.data_ptr():  # fused kernels already wrote in place
                dst.data.copy_(tensor)

        return self.execute(plan, sink, digest=digest, targets={n: t.data for n, t in targets.items()})


def check_device(device: str | torch.device) -> torch.device:
    """The torch device a merge runs on: ``cpu``, or ``cuda``/``cuda:N`` when that GPU exists.

    Raises:
        EvomergeError: not a device string, a device type evomerge does not merge on (``tpu``,
            ``mps``, ``meta``...), or a CUDA device this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EvomergeError(f"--device {str(device)!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvomergeError(f"--device {device}: no CUDA device is available (torch.cuda.is_available() is false); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise EvomergeError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        raise EvomergeError(f"--device {device}: evomerge merges on cpu or cuda[:N], not {dev.type}")
    return dev


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


def merge_in_memory(recipe: MergeConfig | Mapping[str, Any] | str | Path, *, device: str = "cpu", seed: int = 0, allow_crimes: bool = False) -> torch.nn.Module:
    """Merge a recipe into a new in-memory ``transformers`` model (no disk writes).

    Args:
        recipe: a recipe file, mapping or :class:`MergeConfig`.
        device: where the model lives.
        seed: seed for random masks.

    Returns:
        The merged model, in eval mode, with ``model.evomerge_digest`` set to its tensor hash.
    """
    cfg = recipe if isinstance(recipe, MergeConfig) else load_recipe(recipe)
    merger = Merger(open_sources(cfg.referenced_models(), file=cfg.source_file), device=device, seed=seed, allow_crimes=allow_crimes)
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
    atomic = AtomicDir(out_dir, force=force)  # refuses a non-empty or unwritable target, creates nothing
    sources = open_sources(cfg.referenced_models(), file=cfg.source_file, allow_bin=allow_bin)
    merger = Merger(sources, device=device, seed=seed, allow_crimes=allow_crimes, stream=stream)
    plan = merger.plan(cfg)
    out_dtype = torch_dtype(plan.out_dtype)
    try:
        with atomic:  # removes its temp dir on any error below
            writer = ShardedWriter(atomic.path, [(t.out_name, t.shape, out_dtype) for t in plan.tasks], max_shard)
            try:
                result = merger.execute(plan, writer.write, fingerprint=fingerprint)
                writer.close()
            finally:
                writer.abort()
            _write_metadata(atomic.path, plan, sources, copy_tokenizer, recipe_text, card_extra)
    except MergeError as e:
        raise MergeError(f"{cfg.source_file}: {e}" if cfg.source_file else str(e)) from None
    except OSError as e:  # disk full, a permission changed mid-merge...
        raise EvomergeError(f"output {out_dir}: cannot write the merged model: {one_line(e.strerror or e)}") from None
    result.out_dir = Path(out_dir)
    return result


def _write_metadata(path: Path, plan: MergePlan, sources: Mapping[str, ModelSource], copy_tokenizer: bool, recipe_text: str | None, card_extra: str) -> None:
    cfg = plan.recipe
    (path / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
    ref_dir = sources[plan.reference].path
    if (ref_dir / "generation_config.json").is_file():
        shutil.copy2(ref_dir / "generation_config.json", path / "generation_config.json")
    if copy_tokenizer:
        tok = cfg.tokenizer_source
        if tok is None or tok == "base":
            tok_dir = ref_dir
        elif tok in sources:
            tok_dir = sources[tok].path
        else:
            tok_dir = resolve_model(tok, file=cfg.source_file, field="tokenizer_source")
        for name in _TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, path / name)
        if cfg.chat_template:
            tc_path = path / "tokenizer_config.json"
            tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
            tc["chat_template"] = cfg.chat_template
            tc_path.write_text(json.dumps(tc, indent=2) + "\n")
            (path / "chat_template.jinja").unlink(missing_ok=True)
    text = recipe_text if recipe_text is not None else dump_yaml(dict(cfg.raw))
    (path / "mergekit_config.yml").write_text(text)
    (path / "README.md").write_text(render_card(plan, text, extra=card_extra))


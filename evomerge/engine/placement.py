"""Where a resident merger keeps its sources: on the merge device, or in pinned host memory.

The search merges the same sources trial after trial. Sources are held in their stored dtype
(bf16/f16: 2 bytes a parameter, half of float32) and kernels compute in float32 chunk by chunk.
On a GPU they stay on the card when they fit a budget; otherwise they sit in pinned host memory
and each merge streams them to the card tensor by tensor (a PCIe 5 link moves four 7B bf16
sources, 58 GB, in a second or two: small next to evaluating a 7B model).

The budget is the device memory evomerge may use (the free memory at start, or ``--gpu-memory``)
minus what the trial needs besides the sources: the merged model (the largest source's size),
room for evaluation (activations, logits, KV cache: :data:`EVAL_MIN` or a quarter of the model,
whichever is larger) and the merge kernels' scratch (:data:`SCRATCH`). Worked example, four 7B
sources (7.24e9 parameters, bf16) on an 80 GB H100 (79.1 GiB free)::

    sources 4 x 13.49 GiB = 53.96 GiB     model 13.49 GiB     eval room 4 GiB     scratch 1 GiB
    53.96 + 13.49 + 4 + 1 = 72.44 GiB <= 79.1 GiB: sources on the device, 6.7 GiB to spare

(in float32 the sources alone would be 107.9 GiB). ``tests/engine/test_placement.py`` checks
this arithmetic; the search log prints it for the study's own models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.engine.sources import ModelSource
from evomerge.engine.writer import parse_size
from evomerge.errors import EvomergeError

__all__ = [
    "SourceTensors",
    "Placement",
    "choose_placement",
    "place_sources",
    "budget_override",
    "free_memory",
    "check_device",
    "device_memory",
    "cache_budget",
    "EVAL_MIN",
    "SCRATCH",
    "GPU_MEMORY_ENV",
]

EVAL_MIN = 4 << 30  # room for evaluation at least (activations, logits, KV cache)
SCRATCH = 1 << 30  # merge kernels' buffers, a fingerprint's slabs, the CUDA context's slack
GPU_MEMORY_ENV = "EVOMERGE_GPU_MEMORY"  # what ``--gpu-memory`` sets (worker processes inherit it)
_GiB = float(1 << 30)


@dataclass(frozen=True)
class Placement:
    """A resident merger's decision and the bytes behind it.

    Attributes:
        where: ``"device"`` (sources on the GPU), ``"host"`` (pinned host memory, streamed to the
            GPU each merge) or ``"cpu"`` (merging on the CPU: sources in host memory).
        sources: bytes of every source tensor, in their stored dtypes.
        model: bytes reserved for the merged model.
        eval_room: bytes reserved for evaluation.
        scratch: bytes reserved for the merge kernels.
        available: device memory evomerge may use (free memory, or the override).
        overridden: ``available`` came from ``--gpu-memory``.
    """

    where: str
    sources: int
    model: int
    eval_room: int
    scratch: int
    available: int
    overridden: bool = False

    @property
    def needed(self) -> int:
        """Bytes the trial needs on the device with the sources there."""
        return self.sources + self.model + self.eval_room + self.scratch

    def describe(self) -> str:
        """One line for the search log: the choice and its accounting, in GiB."""
        if self.where == "cpu":
            return f"placement: sources in host memory in their stored dtypes ({self.sources / _GiB:.2f} GiB), merged on the CPU"
        src = "--gpu-memory" if self.overridden else "free"
        sums = (
            f"sources {self.sources / _GiB:.2f} + model {self.model / _GiB:.2f} + eval room {self.eval_room / _GiB:.2f} "
            f"+ scratch {self.scratch / _GiB:.2f} = {self.needed / _GiB:.2f} GiB"
        )
        if self.where == "device":
            return f"placement: sources on the GPU in their stored dtypes: {sums} <= {self.available / _GiB:.2f} GiB {src}"
        return (
            f"placement: sources in pinned host memory, streamed to the GPU tensor by tensor each merge: "
            f"{sums} > {self.available / _GiB:.2f} GiB {src}"
        )


def choose_placement(
    sources: int,
    model: int,
    available: int,
    *,
    device_type: str = "cuda",
    eval_room: int | None = None,
    overridden: bool = False,
) -> Placement:
    """Decide where resident sources live.

    Args:
        sources: bytes of the sources in their stored dtypes.
        model: bytes of the merged model.
        available: device memory evomerge may use.
        device_type: ``"cuda"`` or ``"cpu"`` (on the CPU there is only host memory).
        eval_room: bytes for evaluation (default: ``max(EVAL_MIN, model // 4)``).
        overridden: ``available`` is the user's ``--gpu-memory``.

    Returns:
        The :class:`Placement`: ``device`` when everything fits ``available``, else ``host``.

    Example:
        >>> p = choose_placement(4 * 14_480_000_000, 14_480_000_000, 79 << 30)
        >>> p.where, round(p.needed / 2**30, 1)
        ('device', 72.4)
    """
    room = max(EVAL_MIN, model // 4) if eval_room is None else eval_room
    fits = sources + model + room + SCRATCH <= available
    where = "cpu" if device_type == "cpu" else "device" if fits else "host"
    return Placement(where, sources, model, room, SCRATCH, available, overridden)


def budget_override(value: str | int | None = None) -> int | None:
    """The ``--gpu-memory`` budget in bytes: ``value``, else ``$EVOMERGE_GPU_MEMORY``, else None.

    Raises:
        EvomergeError: not a positive size (``60GB``, ``500M``, a byte count).
    """
    raw = value if value is not None else os.environ.get(GPU_MEMORY_ENV) or None
    if raw is None:
        return None
    try:
        return parse_size(raw)
    except EvomergeError:
        raise EvomergeError(
            f"--gpu-memory: cannot read {raw!r}; use a size such as 60GB or 500M (decimal units), or a byte count"
        ) from None


def free_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device now (``torch.cuda.mem_get_info``), capped by a per-process
    memory fraction when one is set (``torch.cuda.set_per_process_memory_fraction``)."""
    free, total = torch.cuda.mem_get_info(device)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = getter(device) if getter is not None else 1.0
    if fraction < 1.0:
        free = min(free, int(total * fraction) - torch.cuda.memory_reserved(device))
    return free


def place_sources(
    sources: Mapping[str, Any],
    device: torch.device,
    *,
    hold: str = "stored",
    override: int | None = None,
) -> Placement:
    """Where a resident merger over ``sources`` keeps them (see :func:`choose_placement`).

    Args:
        sources: opened models (``names()`` and ``nbytes(name)``).
        device: the merge device.
        hold: ``"stored"`` dtypes, or ``"compute"`` (float32 copies: counted at 4 bytes).
        override: the ``--gpu-memory`` budget in bytes, if given.

    Returns:
        The placement; the merged model is counted at the largest source's size.
    """
    per_source = [sum(src.nbytes(n) for n in src.names()) for src in sources.values()]
    total, model = sum(per_source), max(per_source, default=0)
    if hold == "compute":  # float32 copies of bf16 sources: twice the bytes
        total, model = 2 * total, 2 * model
    if device.type != "cuda":
        return choose_placement(total, model, device_memory(device), device_type="cpu")
    available = override if override is not None else free_memory(device)
    return choose_placement(total, model, available, overridden=override is not None)


def check_device(device: str | torch.device) -> torch.device:
    """The torch device a merge runs on: ``cpu``, or ``cuda``/``cuda:N`` when that GPU exists.

    Raises:
        EvomergeError: not a device string, a device type evomerge does not merge on (``tpu``,
            ``mps``, ``meta``...), or a CUDA device this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EvomergeError(
            f"--device {str(device)!r}: not a device; use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvomergeError(
                f"--device {device}: no CUDA device is available (torch.cuda.is_available() is false); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise EvomergeError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif dev.type != "cpu":
        raise EvomergeError(
            f"--device {device}: evomerge merges on cpu or cuda[:N], not {dev.type}"
        )
    return dev


def cache_budget(device: torch.device, placement: Placement | None) -> int:
    """Bytes for a resident merger's prep cache by default. The prep cache's default budget: a quarter of the memory on a CPU; on a GPU what the
    placement leaves spare (sources on the device), or what is left beside the model, evaluation
    and one streamed task's inputs (sources on the host; a few GB, the cache holds sort orders)."""
    if device.type != "cuda" or placement is None:
        return device_memory(device) // 4
    if placement.where == "device":
        return max(0, placement.available - placement.needed)
    return max(
        0, (placement.available - placement.model - placement.eval_room - placement.scratch) // 2
    )


def device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device, or of this machine for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


class SourceTensors:
    """The source tensors a merger reads: streamed from the sources, or held resident.

    Streamed (``placement`` None), each read comes from the source (a memory map on a CPU) in its
    stored dtype, on ``device``. Resident, each tensor is read once and kept where the placement
    says: on ``device``, or in pinned host memory and copied to ``device`` at each read. Held in
    the stored dtype (``hold="stored"``; bf16 takes half the memory of float32, and kernels
    convert chunk by chunk) or converted once to the compute dtype (``hold="compute"``).

    Args:
        sources: opened models by reference.
        device: where reads are delivered.
        placement: where resident tensors live; None streams.
        hold: ``"stored"`` or ``"compute"``.
    """

    def __init__(
        self,
        sources: dict[str, ModelSource],
        device: torch.device,
        placement: Placement | None,
        hold: str = "stored",
    ) -> None:
        self.sources = sources
        self.device = device
        self.placement = placement
        self.hold = hold
        self.held: dict[tuple[str, str, torch.dtype | None], torch.Tensor] = {}

    def get(self, ref: str, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` of source ``ref`` on the device (integer tensors converted to ``dtype``)."""
        if self.placement is None:
            t = self.sources[ref].get(name)
            return t.to(self.device, dtype) if not t.is_floating_point() else t.to(self.device)
        compute = self.hold == "compute"
        key = (ref, name, dtype if compute else None)
        held = self.held.get(key)
        if held is None:
            held = self.sources[ref].get(name)
            if compute or not held.is_floating_point():
                held = held.to(dtype)
            where = self.placement.where
            held = held.pin_memory() if where == "host" else held.to(self.device)
            self.held[key] = held
        if self.placement.where == "host":
            return held.to(self.device, non_blocking=True)
        return held

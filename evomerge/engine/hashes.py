"""Hashes of merged tensors: a sha256 of their bytes, and a fast fingerprint computed where they are.

The sha256 (:func:`tensor_digest`, :func:`tensors_digest`) hashes each tensor's bytes on the CPU;
``evomerge merge`` prints it and exports check it. The fingerprint (:class:`Fingerprint`) is the
search's per-trial hash on CUDA.

A sha256 of the merged model needs every byte on the CPU: for a 1B model on a GPU that copy and
hash took most of a trial's merge time. The fingerprint is computed on the tensors' device and
only a few kilobytes cross to the CPU:

- a tensor's bytes are read as signed 16-bit words ``x`` (bytes for 1-byte dtypes), in rows of
  ``ROW`` = 65536 words (the last row shorter);
- each row gives two sums ``S_a = sum_j a_j x_j`` and ``S_b = sum_j b_j x_j`` with fixed
  pseudo-random weights ``a_j, b_j`` in [1, 2**31) (:func:`~evomerge.engine.rng.hash32` of the
  column): every product is below 2**46 and every sum below 2**62, so the sums are exact int64
  integers, the same whatever order a device adds them in;
- the fingerprint is sha256 over (name, shape, dtype, row sums) of every tensor, sorted by name.

Two tensors that differ in a row get the same two sums only when both weighted sums of their
difference vanish: for weights unrelated to the data, a chance of about 2**-31 each, 2**-62 for
both. That is ample for telling trials' tensors apart (the search reuses the scores of a trial
with the same fingerprint); it is no defence against a forger, and exports keep a sha256.
Fingerprints carry the prefix ``fp1-``, so they are never mistaken for a sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.kernels.chunked import run_chunks
from evomerge.engine.rng import hash32
from evomerge.engine.sources import ModelSource

__all__ = [
    "PREFIX",
    "ROW",
    "Fingerprint",
    "is_fingerprint",
    "row_sums",
    "tensor_digest",
    "tensors_digest",
    "digest_model_dir",
]

PREFIX = "fp1-"
ROW = 1 << 16
_KEYS = ((0x2545F491, 0x5851F42D), (0x14057B7E, 0x4C957F2D))
_TABLES: dict[torch.device, torch.Tensor] = {}
_SLAB = 1 << 24  # words per pass on a GPU: bounds the int64 temporaries to 128 MiB each


def is_fingerprint(digest: str) -> bool:
    """Whether a recorded tensor hash is a fingerprint (else a sha256)."""
    return digest.startswith(PREFIX)


def _table(device: torch.device) -> torch.Tensor:
    """The two weight rows, ``(2, ROW)`` int64 in [1, 2**31), on ``device``."""
    t = _TABLES.get(device)
    if t is None:
        j = torch.arange(ROW, dtype=torch.int64)
        t = torch.stack([(hash32(j, k0, k1) >> 1) | 1 for k0, k1 in _KEYS]).to(device)
        _TABLES[device] = t
    return t


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    if flat.element_size() == 1:
        return flat.view(torch.uint8)
    return flat.view(torch.int16)


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """The tensor's two weighted sums per row of 16-bit words, ``(rows, 2)`` int64 on its device.

    Example:
        >>> row_sums(torch.zeros(3)).tolist()
        [[0, 0]]
    """
    w = _words(t)
    n = w.numel()
    table = _table(w.device)
    if n == 0:
        return torch.zeros((0, 2), dtype=torch.int64, device=w.device)
    if w.device.type == "cpu":
        return _row_sums_cpu(w, table)
    return _row_sums_slabs(w, table)


def _row_sums_slabs(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # GPU: whole-tensor int64 ops over slabs of rows (memory-bound; nothing leaves the device).
    n = w.numel()
    full = n // ROW
    parts = []
    step = max(1, _SLAB // ROW)
    for r0 in range(0, full, step):  # whole rows, a slab at a time
        r1 = min(full, r0 + step)
        x = w[r0 * ROW : r1 * ROW].view(r1 - r0, 1, ROW).to(torch.int64)
        parts.append((x * table).sum(-1))  # (rows, 2)
    tail = n - full * ROW
    if tail:
        x = w[full * ROW :].to(torch.int64)
        parts.append((x * table[:, :tail]).sum(-1).view(1, 2))
    return torch.cat(parts)


def _row_sums_cpu(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # One row per chunk, in the chunked kernels' thread pool: the int64 words and products stay
    # in cache (whole-tensor int64 temporaries made this many times slower than a sha256).
    rows = (w.numel() + ROW - 1) // ROW

    def fn(r: int, _hi: int, s: Any) -> tuple[int, int]:
        lo = r * ROW
        m = min(w.numel(), lo + ROW) - lo
        x, p = s.get("fpx", m, torch.int64), s.get("fpp", m, torch.int64)
        x.copy_(w[lo : lo + m])
        torch.mul(x, table[0, :m], out=p)
        a = int(p.sum())
        torch.mul(x, table[1, :m], out=p)
        return a, int(p.sum())

    return torch.tensor(run_chunks(rows, w.device, fn, chunk=1), dtype=torch.int64).view(rows, 2)


class Fingerprint:
    """Accumulates tensors' row sums on their device; :meth:`hexdigest` fetches them once.

    Example:
        >>> fp = Fingerprint(); fp.add("w", torch.ones(4)); fp.hexdigest()[:4]
        'fp1-'
    """

    def __init__(self) -> None:
        self._sums: dict[str, tuple[tuple[int, ...], str, torch.Tensor]] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        """Fingerprint one tensor (its sums stay on its device until :meth:`hexdigest`)."""
        self._sums[name] = (tuple(t.shape), str(t.dtype), row_sums(t))

    def hexdigest(self) -> str:
        """``fp1-`` and 32 hex digits of sha256 over every tensor's name, shape, dtype and sums."""
        h = hashlib.sha256()
        for name in sorted(self._sums):
            shape, dtype, sums = self._sums[name]
            h.update(f"{name}|{list(shape)}|{dtype}|".encode())
            h.update(sums.to("cpu").contiguous().view(torch.uint8).numpy().data)
        return PREFIX + h.hexdigest()[:32]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype and bytes (copied to the CPU)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}|".encode())
    h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def tensors_digest(per_tensor: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """One hash for a set of tensors: sha256 over (name, shape, tensor digest), sorted by name."""
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}|{list(shapes[name])}|{per_tensor[name]}\n".encode())
    return h.hexdigest()


def digest_model_dir(path: str | Path, kind: str = "sha256") -> str:
    """The tensor hash of a saved model directory (same value as the merge that wrote it).

    Args:
        path: the model directory.
        kind: ``"sha256"`` or ``"fingerprint"`` (:class:`Fingerprint`).
    """
    src = ModelSource(str(path), Path(path))
    per, shapes = {}, {}
    fp = Fingerprint()
    for name in src.names():
        t = src.get(name)
        if kind == "fingerprint":
            fp.add(name, t)
            continue
        per[name] = tensor_digest(t)
        shapes[name] = tuple(t.shape)
    return fp.hexdigest() if kind == "fingerprint" else tensors_digest(per, shapes)

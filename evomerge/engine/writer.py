"""Writing a merged model: streamed safetensors shards in a directory that appears atomically.

The planner knows every output tensor's name, shape and dtype before the first one is computed,
so each shard's safetensors header is written up front and tensors are appended as they are
merged: the writer holds one tensor at a time, never a shard. (The safetensors library only writes
whole dicts, hence this small streaming writer; files are read back with the library in tests.)

The output directory is built as a hidden temp directory beside the target and renamed into place
at the end, so an interrupted merge never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from evomerge.dtypes import code_of
from evomerge.errors import EvomergeError

__all__ = ["ShardedWriter", "AtomicDir", "parse_size"]


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500M``, ``2G`` or a plain number (decimal units, like mergekit).

    Example:
        >>> parse_size("2GB"), parse_size("500M"), parse_size(1024)
        (2000000000, 500000000, 1024)
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in scale:
            return int(float(s[:-1]) * scale[s[-1]])
        return int(s)
    except ValueError:
        raise EvomergeError(f"--out-shard-size: cannot read {text!r} (use e.g. 2GB, 500M, or a byte count)") from None


class ShardedWriter:
    """Stream tensors into safetensors shards whose layout is fixed up front.

    Args:
        directory: where the shards go.
        specs: ``(name, shape, dtype)`` of every tensor, in the order they will be written.
        max_shard_bytes: a new shard starts when the next tensor would exceed this size.
    """

    def __init__(self, directory: Path, specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> None:
        self.directory = directory
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._order = [(si, name) for si, shard in enumerate(shards) for name, *_ in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._open_shard = -1
        self.total_bytes = sum(e[3] for shard in shards for e in shard)

    def _start(self, si: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self._shards[si]:
            header[name] = {"dtype": code_of(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.directory / self.files[si], "wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._open_shard = si

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (must come in the order given to the constructor)."""
        si, expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"writer expected {expected}, got {name}")
        if si != self._open_shard:
            self._start(si)
        assert self._handle is not None
        t = tensor.detach().to("cpu").contiguous()
        self._handle.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the last shard and, when sharded, write ``model.safetensors.index.json``."""
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.files[si] for si, name in self._order},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class AtomicDir:
    """A directory that appears at ``target`` only when complete.

    Use as a context manager: write into ``.path``; on a clean exit it is renamed to ``target``
    (replacing an existing one only with ``force``); on an exception it is removed.

    Raises:
        EvomergeError: ``target`` exists, is not empty, and ``force`` is off.
    """

    def __init__(self, target: str | os.PathLike[str], force: bool = False) -> None:
        self.target = Path(target)
        self.force = force
        if self.target.exists() and not self.target.is_dir():
            raise EvomergeError(f"output {self.target} exists and is not a directory")
        if self.target.is_dir() and any(self.target.iterdir()) and not force:
            raise EvomergeError(f"output directory {self.target} exists and is not empty (use --force to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.target)
        self.path = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)

    def __enter__(self) -> AtomicDir:
        self.path.mkdir()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    # Temp dirs left by a killed process (kill -9 skips cleanup): remove those whose process is gone.
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass

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
from evomerge.errors import EvomergeError, one_line

__all__ = ["ShardedWriter", "AtomicDir", "parse_size"]


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500M``, ``2G`` or a plain number (decimal units, like mergekit).

    A bare ``B`` after a number (``5B``) is refused: mergekit reads it as billions, a byte unit
    would make it bytes, and either guess could be the wrong one.

    Example:
        >>> parse_size("2GB"), parse_size("500M"), parse_size(1024)
        (2000000000, 500000000, 1024)

    Raises:
        EvomergeError: not a size, or not positive.
    """
    hint = "use e.g. 2GB, 500M, or a byte count"
    if isinstance(text, int):
        n = text
    else:
        raw = str(text).strip().upper()
        s = raw.removesuffix("B")
        scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
        if raw.endswith("B") and s[-1:].isdigit():
            raise EvomergeError(
                f"--out-shard-size: {text!r} is ambiguous (mergekit reads B as billions); write {s}GB for {s} billion bytes, or {s} for {s} bytes"
            )
        try:
            n = int(float(s[:-1]) * scale[s[-1]]) if s and s[-1] in scale else int(s)
        except (ValueError, OverflowError):
            raise EvomergeError(f"--out-shard-size: cannot read {text!r} ({hint})") from None
    if n <= 0:
        raise EvomergeError(f"--out-shard-size: must be a positive size, got {text!r} ({hint})")
    return n


class ShardedWriter:
    """Stream tensors into safetensors shards whose layout is fixed up front.

    Args:
        directory: where the shards go.
        specs: ``(name, shape, dtype)`` of every tensor, in the order they will be written.
        max_shard_bytes: a new shard starts when the next tensor would exceed this size.
    """

    def __init__(
        self,
        directory: Path,
        specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ) -> None:
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
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
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
            header[name] = {
                "dtype": code_of(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
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
        self._handle.write(t.reshape(-1).view(torch.uint8).numpy().data)
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
            (self.directory / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )

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
    (replacing an existing one only with ``force``); on an exception it is removed. The
    constructor checks the target without creating anything, so a merge that fails before
    ``__enter__`` leaves the file system as it was.

    Raises:
        EvomergeError: ``target`` is not empty and ``force`` is off, is a file, lies under a file,
            or cannot be written (no permission, read-only file system...).
    """

    def __init__(self, target: str | os.PathLike[str], force: bool = False) -> None:
        self.target = Path(target)
        self.force = force
        if self.target.exists() and not self.target.is_dir():
            raise EvomergeError(
                f"output {self.target} exists and is not a directory; give a directory path"
            )
        if self.target.is_dir() and any(self.target.iterdir()) and not force:
            raise EvomergeError(
                f"output directory {self.target} exists and is not empty (use --force to replace it)"
            )
        # The nearest existing ancestor must be a directory we may write into.
        parent = self.target.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise EvomergeError(f"output {self.target}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise EvomergeError(f"output {self.target}: no permission to create it in {parent}")
        self.path = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"

    def __enter__(self) -> AtomicDir:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.target)
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir()
        except OSError as e:
            raise EvomergeError(
                f"output {self.target}: cannot create it: {one_line(e.strerror or e)}"
            ) from None
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        try:
            if self.target.exists():
                old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
                os.replace(self.target, old)
            os.replace(self.path, self.target)
        except OSError as e:
            shutil.rmtree(self.path, ignore_errors=True)
            if old is not None and not self.target.exists():
                os.replace(old, self.target)  # put the replaced directory back
            raise EvomergeError(
                f"output {self.target}: cannot move the merged model into place: {one_line(e.strerror or e)}"
            ) from None
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

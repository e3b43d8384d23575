"""Model directories: where a reference points, which tensors it holds, and reading them lazily.

A reference is a local directory, a Hugging Face hub id (``org/name`` or ``org/name@revision``,
taken from the local HF cache, downloaded only when the hub is reachable and
``HF_HUB_OFFLINE`` is unset), or a reference of a registered scheme (``zoo:demo/base``, see
:mod:`evomerge.schemes`).

Tensors come from safetensors files through memory maps: opening a 7B model costs nothing, and a
tensor's pages are read when the merge touches them, so models larger than RAM stream. ``.bin``
checkpoints are read only when explicitly allowed, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import code_of, itemsize
from evomerge.engine.arch import Arch, detect_arch
from evomerge.errors import ConfigError, EvomergeError, did_you_mean, one_line
from evomerge.schemes import known_refs, resolve, scheme_of

__all__ = ["ModelSource", "resolve_model", "open_sources", "open_missing"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_FETCH = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "README.md",
    "mergekit_config.yml",
    "*.tiktoken",
]


def resolve_model(
    ref: str, *, file: str | None = None, field: str | None = None, allow_download: bool = True
) -> Path:
    """The local directory of a model reference.

    Args:
        ref: local path, hub id (optionally ``@revision``) or a scheme reference (``zoo:demo/base``).
        file: the file the reference was written in, for the error message.
        field: the field it was written in, for the error message.
        allow_download: try the hub when the model is not cached and the hub is not disabled.

    Returns:
        A directory holding ``config.json``.

    Raises:
        ConfigError: the model cannot be found locally (and cannot be fetched).
    """
    if scheme_of(ref) is not None:
        path = resolve(ref)
        if path is None:
            raise ConfigError(
                file,
                field,
                f"unknown model {ref!r}" + did_you_mean(ref, known_refs(ref), show_all=0),
            )
        return path
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(file, field, f"model directory {ref!r} has no config.json")
        return local.resolve()
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise ConfigError(file, field, f"model {ref!r} not found: no such directory")
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ConfigError(file, field, f"model {ref!r}: not a local directory") from None
    try:
        return Path(
            snapshot_download(
                repo, revision=revision or None, local_files_only=True, allow_patterns=_FETCH
            )
        )
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not allow_download or offline:
        raise ConfigError(
            file,
            field,
            f"model {ref!r} is not a local directory and not in the Hugging Face cache (offline: HF_HUB_OFFLINE is set)",
        )
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=_FETCH))
    except Exception as e:
        raise ConfigError(
            file,
            field,
            f"model {ref!r} is not a local directory, not in the Hugging Face cache, and could not be downloaded ({one_line(type(e).__name__)}); check the name or your connection",
        ) from None


class ModelSource:
    """One model's checkpoint, opened lazily.

    Args:
        ref: the reference as written in the recipe.
        path: its local directory.
        allow_bin: also read PyTorch ``.bin`` checkpoints (``weights_only=True``).

    Every file is checked when the source is opened (``config.json``, the shard index, and each
    safetensors header against its file's size), so a damaged download is reported before any
    tensor is merged, and a memory map never points past the end of its file.

    Raises:
        EvomergeError: no readable checkpoint in the directory, or an unreadable file (named).
    """

    def __init__(self, ref: str, path: Path, *, allow_bin: bool = False) -> None:
        self.ref = ref
        self.path = path
        self.config: dict[str, Any] = _read_json_object(
            path / "config.json", ref, "the model's config"
        )
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._index(allow_bin)
        self.arch: Arch = detect_arch(self.config, self._where)

    def _index(self, allow_bin: bool) -> None:
        from safetensors import SafetensorError, safe_open

        files = sorted(self.path.glob("*.safetensors"))
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = _shards_of_index(index, self.ref)
        if files:
            for f in files:
                _check_safetensors(f, self.ref)
                try:
                    h = safe_open(str(f), framework="pt", device="cpu")
                except (SafetensorError, OSError) as e:  # the library's own checks of the header
                    raise _unreadable(
                        f,
                        self.ref,
                        f"is not a valid safetensors file: {one_line(e)} (a damaged download? download it again)",
                    ) from None
                self._handles[f] = h
                for name in h.keys():
                    sl = h.get_slice(name)
                    self._where[name] = f
                    self._shapes[name] = tuple(sl.get_shape())
                    self._dtypes[name] = sl.get_dtype()
            return
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if bins and allow_bin:
            self._bin = {}
            for f in bins:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # a damaged zip, a refused pickle, an I/O error...
                    raise _unreadable(
                        f, self.ref, f"is not a readable PyTorch checkpoint ({one_line(e)[:200]})"
                    ) from None
                if not isinstance(sd, dict) or not all(
                    isinstance(t, torch.Tensor) for t in sd.values()
                ):
                    raise _unreadable(
                        f, self.ref, "does not hold a flat dict of tensors (a state dict)"
                    )
                for name, t in sd.items():
                    self._bin[name] = t
                    self._where[name] = f
                    self._shapes[name] = tuple(t.shape)
                    self._dtypes[name] = str(t.dtype)
            return
        if bins:
            raise EvomergeError(
                f"model {self.ref!r} has only PyTorch .bin weights; pass --allow-bin to read them (loaded with weights_only=True), or convert it to safetensors"
            )
        raise EvomergeError(f"model {self.ref!r}: no *.safetensors weights in {self.path}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def files(self) -> list[Path]:
        """The files the model's tensors and config are read from, sorted."""
        return sorted({self.path / "config.json", *self._where.values()})

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype_code(self, name: str) -> str:
        """The stored dtype as safetensors writes it (``BF16``, ``F32``...)."""
        return code_of(self._dtypes[name])

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self._shapes[name]:
            n *= s
        return n * itemsize(self.dtype_code(name))

    def get(self, name: str) -> torch.Tensor:
        """The tensor, on the CPU in its stored dtype (memory-mapped, not copied, for safetensors)."""
        if self._bin is not None:
            return self._bin[name]
        from safetensors import SafetensorError

        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except (
            SafetensorError,
            OSError,
        ) as e:  # the file changed since it was opened, or an I/O error
            raise _unreadable(f, self.ref, f"cannot read tensor {name} ({one_line(e)})") from None

    def __repr__(self) -> str:
        return (
            f"ModelSource({self.ref!r}, {len(self._where)} tensors, {self.arch.num_layers} layers)"
        )


# safetensors refuses headers above 100 MB; a larger length means the file is something else.
_MAX_HEADER = 100_000_000


def _unreadable(f: Path, ref: str, why: str) -> EvomergeError:
    # Name the model too when its reference does not show in the path (a hub id, a zoo reference).
    where = f"{f}" if ref in str(f) else f"model {ref!r}: {f}"
    return EvomergeError(f"{where}: {why}")


def _read_json_object(f: Path, ref: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise _unreadable(f, ref, f"cannot read {what}: {one_line(e.strerror or e)}") from None
    except UnicodeDecodeError:
        raise _unreadable(
            f, ref, f"{what} is not UTF-8 text; expected a JSON object (a damaged download?)"
        ) from None
    except json.JSONDecodeError as e:
        raise _unreadable(
            f,
            ref,
            f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected a JSON object (a damaged download?)",
        ) from None
    if not isinstance(data, dict):
        raise _unreadable(f, ref, f"{what} must be a JSON object, got a JSON {type(data).__name__}")
    return data


def _shards_of_index(index: Path, ref: str) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names, each checked to exist."""
    weight_map = _read_json_object(index, ref, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _unreadable(
            index,
            ref,
            "weight_map: must be a non-empty JSON object mapping tensor names to shard files",
        )
    bad = next((v for v in weight_map.values() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise _unreadable(index, ref, f"weight_map: shard file names must be strings, got {bad!r}")
    files = sorted({index.parent / v for v in weight_map.values()})
    for f in files:
        if not f.is_file():
            why = "is a directory" if f.is_dir() else "does not exist"
            raise _unreadable(
                index,
                ref,
                f"weight_map names shard {f.name}, which {why} (an interrupted download? download the model again)",
            )
    return files


def _check_safetensors(f: Path, ref: str) -> None:
    """Check a safetensors file's header against its size, reading only the header.

    The library memory-maps the file, so tensor offsets past its end would fail only when read
    (or crash the process); checking them here reports a truncated download when it is opened.
    """
    try:
        size = f.stat().st_size
        if not f.is_file():
            raise _unreadable(f, ref, "is not a file")
        with open(f, "rb") as fh:
            start = fh.read(64)
            head = start[:8]
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            fh.seek(8)
            raw = fh.read(n) if 0 < n <= min(size - 8, _MAX_HEADER) else b""
    except OSError as e:
        raise _unreadable(f, ref, f"cannot read: {one_line(e.strerror or e)}") from None
    if size == 0:
        raise _unreadable(f, ref, "is empty (an interrupted download? download it again)")
    if start.startswith(b"version https://git-lfs"):
        raise _unreadable(
            f,
            ref,
            "is a Git LFS pointer, not the weights (run `git lfs pull` in the model's repository)",
        )
    if n < 0:
        raise _unreadable(
            f,
            ref,
            f"is only {size} bytes: truncated, or not a safetensors file (an interrupted download? download it again)",
        )
    if n > _MAX_HEADER:
        raise _unreadable(
            f,
            ref,
            f"is not a safetensors file: it starts with {head!r}, not a header length (an error page saved as weights, or another format?)",
        )
    if n > size - 8:
        raise _unreadable(
            f,
            ref,
            f"is truncated: its header is {n} bytes but the file has {size} bytes (an interrupted download? download it again)",
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise _unreadable(f, ref, "is not a safetensors file: its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise _unreadable(
                f,
                ref,
                f"header entry {name!r} has no valid data_offsets [begin, end] (a damaged file)",
            )
        end = max(end, offsets[1])
    data = size - 8 - n
    if end > data:
        raise _unreadable(
            f,
            ref,
            f"is truncated: its header says the tensor data takes {end} bytes but the file holds {data} (an interrupted download? download it again)",
        )


def open_sources(
    refs: list[str],
    *,
    file: str | None = None,
    allow_bin: bool = False,
    fields: dict[str, str] | None = None,
) -> dict[str, ModelSource]:
    """Resolve and open every referenced model once.

    Raises:
        ConfigError / EvomergeError: a model is missing or unreadable.
    """
    out: dict[str, ModelSource] = {}
    for ref in refs:
        if ref not in out:
            path = resolve_model(ref, file=file, field=(fields or {}).get(ref))
            out[ref] = ModelSource(ref, path, allow_bin=allow_bin)
    return out


def open_missing(sources: dict[str, ModelSource], refs: Iterable[str], *, file: str | None) -> None:
    """Open into ``sources`` each of ``refs`` it does not hold yet (a recipe's models beyond the
    space's).

    Raises:
        ConfigError / EvomergeError: a model is missing or unreadable.
    """
    missing = [r for r in refs if r not in sources]
    if missing:
        sources.update(open_sources(missing, file=file))

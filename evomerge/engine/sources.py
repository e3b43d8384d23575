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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import code_of, itemsize
from evomerge.engine.arch import Arch, detect_arch
from evomerge.errors import ConfigError, EvomergeError, did_you_mean, one_line
from evomerge.schemes import known_refs, resolve, scheme_of

__all__ = ["ModelSource", "resolve_model", "open_sources"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_FETCH = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md", "mergekit_config.yml", "*.tiktoken"]


def resolve_model(ref: str, *, file: str | None = None, field: str | None = None, allow_download: bool = True) -> Path:
    """The local directory of a model reference.

    Args:
        ref: local path, hub id (optionally ``@revision``) or a scheme reference (``zoo:demo/base``).
        file, field: where the reference was written, for the error message.
        allow_download: try the hub when the model is not cached and the hub is not disabled.

    Returns:
        A directory holding ``config.json``.

    Raises:
        ConfigError: the model cannot be found locally (and cannot be fetched).
    """
    if scheme_of(ref) is not None:
        path = resolve(ref)
        if path is None:
            raise ConfigError(file, field, f"unknown model {ref!r}" + did_you_mean(ref, [r for r in known_refs(ref) if "/" in r]))
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
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True, allow_patterns=_FETCH))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not allow_download or offline:
        raise ConfigError(file, field, f"model {ref!r} is not a local directory and not in the Hugging Face cache (offline: HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=_FETCH))
    except Exception as e:
        raise ConfigError(file, field, f"model {ref!r} is not a local directory, not in the Hugging Face cache, and could not be downloaded ({one_line(type(e).__name__)}); check the name or your connection") from None


class ModelSource:
    """One model's checkpoint, opened lazily.

    Args:
        ref: the reference as written in the recipe.
        path: its local directory.
        allow_bin: also read PyTorch ``.bin`` checkpoints (``weights_only=True``).

    Raises:
        EvomergeError: no readable checkpoint in the directory.
    """

    def __init__(self, ref: str, path: Path, *, allow_bin: bool = False) -> None:
        self.ref = ref
        self.path = path
        try:
            self.config: dict[str, Any] = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvomergeError(f"model {ref!r}: cannot read {path / 'config.json'}: {one_line(e)}") from None
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._index(allow_bin)
        self.arch: Arch = detect_arch(self.config, self._where)

    def _index(self, allow_bin: bool) -> None:
        from safetensors import safe_open

        files = sorted(self.path.glob("*.safetensors"))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
        if files:
            for f in files:
                h = safe_open(str(f), framework="pt", device="cpu")
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
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                for name, t in sd.items():
                    self._bin[name] = t
                    self._where[name] = f
                    self._shapes[name] = tuple(t.shape)
                    self._dtypes[name] = str(t.dtype)
            return
        if bins:
            raise EvomergeError(f"model {self.ref!r} has only PyTorch .bin weights; pass --allow-bin to read them (loaded with weights_only=True), or convert it to safetensors")
        raise EvomergeError(f"model {self.ref!r}: no *.safetensors weights in {self.path}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

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
        return self._handles[self._where[name]].get_tensor(name)

    def __repr__(self) -> str:
        return f"ModelSource({self.ref!r}, {len(self._where)} tensors, {self.arch.num_layers} layers)"


def open_sources(refs: list[str], *, file: str | None = None, allow_bin: bool = False, fields: dict[str, str] | None = None) -> dict[str, ModelSource]:
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

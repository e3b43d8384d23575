"""Random streams for random masks (DARE, DELLA): which uniform number each tensor entry draws.

A random mask keeps entry ``j`` of input ``i`` of tensor ``name`` where ``u < p``, ``u`` in [0, 1).
Which ``u`` is a *stream*, identified by a version that exported recipes record next to their seed
(``# evomerge-seed: 7 stream 2``), because a new stream changes the tensors an old recipe makes:

- **stream 1** (evomerge up to 0.x, the default of recipes whose seed comment names no stream):
  ``torch.rand`` from a CPU generator, one generator per 2**20-entry block, each seeded from
  (seed, name, input, block). Made on the CPU and copied to the merge device; too slow to draw on
  every re-merge, so the resident merger cached the fields.
- **stream 2** (current): a counter-based hash. ``u`` is a pure function of (seed, tensor name,
  input index, entry index) computed with integer ops only (64-bit integers holding 32-bit
  values, every product below 2**63, right shifts of non-negative values), so CPU, CUDA, the
  chunked and the compiled kernels give the same bits, and any chunk of a field costs a few
  integer ops on the device that needs it: nothing is cached or copied.

The stream 2 hash: with ``(k0, k1)`` the two 32-bit halves of a key derived by sha256 from
(seed, name, input), and ``j = j_hi * 2**32 + j_lo``,
``h = mix(mix(j_lo ^ k0) ^ ((j_hi + k1) mod 2**32))`` and ``u = (h >> 8) / 2**24``, where ``mix`` is a
32-bit xorshift-multiply finalizer (multipliers 0x21F0AAAD and 0x735A2D97, both below 2**31, from
C. Wellons' hash-prospector search). ``mix`` is a bijection of 32-bit words, so the 2**32 entries of
one block draw distinct words. :func:`reference_uniform` is the same formula in plain Python.
"""

from __future__ import annotations

import hashlib
import re

import torch

__all__ = [
    "SEED_PRAGMA",
    "pragma_from_text",
    "seed_from_text",
    "STREAM",
    "STREAMS",
    "stream_seed",
    "stream_keys",
    "check_stream",
    "reference_uniform",
    "hash32",
    "hash_uniform",
    "uniform_range",
    "uniform_field",
]

STREAM = 2  # the stream new merges use
STREAMS = (1, 2)  # the streams this version can draw

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
_SCALE = 2.0**-24
_BLOCK = 1 << 20  # stream 1's generator blocks


def stream_seed(*key: object) -> int:
    """A 63-bit seed from a key, stable across processes and platforms (unlike ``hash``)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stream_keys(seed: int, name: str, index: int) -> tuple[int, int]:
    """Stream 2's two 32-bit keys of input ``index`` of tensor ``name`` under ``seed``."""
    k = stream_seed("uniform", seed, name, index)
    return k & _M32, (k >> 32) & _M32


def check_stream(stream: int) -> int:
    """``stream`` when this version can draw it.

    Raises:
        ValueError: an unknown stream version (an export made by a newer evomerge).
    """
    if stream not in STREAMS:
        raise ValueError(
            f"random stream {stream} is unknown to this evomerge (it draws streams {', '.join(map(str, STREAMS))}); the recipe was exported by a newer version: upgrade evomerge to re-merge it"
        )
    return stream


def _mix_py(x: int) -> int:
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def reference_uniform(seed: int, name: str, index: int, j: int) -> float:
    """Stream 2's ``u`` of entry ``j`` in plain Python integers (the specification the tensor code
    must match bit for bit).

    Example:
        >>> 0.0 <= reference_uniform(0, "model.norm.weight", 1, 5) < 1.0
        True
    """
    k0, k1 = stream_keys(seed, name, index)
    h = _mix_py(_mix_py((j & _M32) ^ k0) ^ (((j >> 32) + k1) & _M32))
    return (h >> 8) * _SCALE


def _mix(x: torch.Tensor) -> torch.Tensor:
    # x: int64 holding values in [0, 2**32); products stay below 2**63 (no signed overflow).
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 15)


def hash32(idx: torch.Tensor, k0: int | torch.Tensor, k1: int | torch.Tensor) -> torch.Tensor:
    """Stream 2's 32-bit word (int64 in [0, 2**32)) of each entry of ``idx`` (int64, non-negative)."""
    h = _mix((idx & _M32) ^ k0)
    return _mix(h ^ (((idx >> 32) + k1) & _M32))


def hash_uniform(idx: torch.Tensor, k0: int | torch.Tensor, k1: int | torch.Tensor) -> torch.Tensor:
    """Stream 2's ``u`` (float32) of the entries ``idx`` (int64, non-negative), as out-of-place
    torch ops that ``torch.compile`` fuses into a kernel's loop."""
    return (hash32(idx, k0, k1) >> 8).to(torch.float32) * _SCALE


def uniform_range(
    k0: int,
    k1: int,
    lo: int,
    hi: int,
    device: torch.device,
    bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stream 2's ``u`` of entries ``[lo, hi)``, computed in place in reusable buffers.

    Args:
        k0, k1: the keys (:func:`stream_keys`).
        lo, hi: the flat entry range.
        device: where to compute.
        bufs: optional scratch ``(int64, int64, float32)`` tensors of ``hi - lo`` entries; the
            result is the float32 one.

    Returns:
        float32 ``u`` values, one per entry.
    """
    if (hi - 1) >> 32:  # past 2**32 entries the high word varies: the out-of-place form (rare)
        return hash_uniform(torch.arange(lo, hi, dtype=torch.int64, device=device), k0, k1)
    m = hi - lo
    if bufs is None:
        bufs = (
            torch.empty(m, dtype=torch.int64, device=device),
            torch.empty(m, dtype=torch.int64, device=device),
            torch.empty(m, dtype=torch.float32, device=device),
        )
    x, t, u = bufs
    torch.arange(lo, hi, dtype=torch.int64, device=device, out=x)
    x.bitwise_xor_(k0)
    _mix_(x, t)
    x.bitwise_xor_(k1)  # (j_hi + k1) mod 2**32 with j_hi = 0
    _mix_(x, t)
    x.bitwise_right_shift_(8)
    u.copy_(x)  # exact: below 2**24
    return u.mul_(_SCALE)


def _mix_(x: torch.Tensor, t: torch.Tensor) -> None:
    """:func:`_mix` in place (``t`` is scratch)."""
    torch.bitwise_right_shift(x, 16, out=t)
    x.bitwise_xor_(t)
    x.mul_(_C1).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x.bitwise_xor_(t)
    x.mul_(_C2).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=t)
    x.bitwise_xor_(t)


def uniform_field(
    seed: int,
    name: str,
    index: int,
    shape: torch.Size,
    device: torch.device | str = "cpu",
    stream: int = STREAM,
) -> torch.Tensor:
    """The U[0, 1) field of input ``index`` of tensor ``name``; the same on every run and device.

    Args:
        seed: the merge seed.
        name: the output tensor's name.
        index: the input's position in the tensor's inputs.
        shape: the field's shape.
        device: where the field goes (stream 2 computes it there).
        stream: the stream version (:data:`STREAMS`).

    Returns:
        float32 values of that shape.

    Raises:
        ValueError: an unknown stream.

    Example:
        >>> a = uniform_field(0, "model.layers.0.mlp.up_proj.weight", 1, torch.Size([3, 4]))
        >>> torch.equal(a, uniform_field(0, "model.layers.0.mlp.up_proj.weight", 1, torch.Size([3, 4])))
        True
    """
    check_stream(stream)
    n = 1
    for s in shape:
        n *= s
    if stream == 2:
        k0, k1 = stream_keys(seed, name, index)
        return uniform_range(k0, k1, 0, n, torch.device(device)).reshape(shape)
    out = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, _BLOCK):
        g = torch.Generator().manual_seed(
            stream_seed("uniform", seed, name, index, start // _BLOCK)
        )
        stop = min(n, start + _BLOCK)
        torch.rand(stop - start, generator=g, out=out[start:stop])
    return out.reshape(shape).to(device)


# A comment line `evomerge merge` reads when --seed is not given, so exported recipes of random
# methods (dare, della) re-merge to the trial's tensors without extra flags. It names the random
# stream too (evomerge.engine.rng): another stream draws other masks from the same seed. A
# comment that names no stream (`# evomerge-seed: N`, as evomerge 0.1.0's first exports wrote
# it) means stream 1.
SEED_PRAGMA = "# evomerge-seed: {seed} stream {stream}"
_PRAGMA_RE = re.compile(r"^#\s*evomerge-seed:(.*)$", re.M)
_VALUE_RE = re.compile(r"^\s*(\d+)(?:\s+stream\s+(\d+))?\s*$")


def pragma_from_text(text: str) -> tuple[int | None, int]:
    """The seed and random stream recorded by :data:`SEED_PRAGMA` in a recipe's text.

    Returns:
        ``(seed, stream)``: ``(None, STREAM)`` without the comment (the current stream); a comment
        naming no stream means stream 1.

    Raises:
        ValueError: a malformed comment, or a stream this version cannot draw (one line).

    Example:
        >>> pragma_from_text("# evomerge-seed: 7 stream 2\\nmerge_method: dare_ties\\n")
        (7, 2)
    """
    m = _PRAGMA_RE.search(text)
    if m is None:
        return None, STREAM
    v = _VALUE_RE.match(m.group(1))
    if v is None:
        raise ValueError(
            f"`# evomerge-seed:{m.group(1)}` must read `# evomerge-seed: N` or `# evomerge-seed: N stream V` (N, V non-negative integers)"
        )
    stream = int(v.group(2)) if v.group(2) is not None else 1
    if stream not in STREAMS:
        raise ValueError(
            f"`# evomerge-seed:{m.group(1)}` names random stream {stream}, which this evomerge cannot draw (streams {', '.join(map(str, STREAMS))}); it was exported by a newer version: upgrade evomerge to reproduce it"
        )
    return int(v.group(1)), stream


def seed_from_text(text: str) -> int | None:
    """The seed recorded by :data:`SEED_PRAGMA` in a recipe's text, if any (see :func:`pragma_from_text`)."""
    m = _PRAGMA_RE.search(text)
    v = _VALUE_RE.match(m.group(1)) if m else None
    return int(v.group(1)) if v else None

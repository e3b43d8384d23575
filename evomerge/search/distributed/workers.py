"""Several workers on one host: ``evomerge search space.yml --workers 4`` (or ``--devices 0,1,2,3``).

One ``evomerge search`` process per device, all on the study's storage, each exactly what a user
would start by hand on another host (``--storage`` the same URL); see :mod:`evomerge.search.loop`
for how they share the study. Each GPU worker sees one GPU (``CUDA_VISIBLE_DEVICES``); CPU workers
share the cores (``OMP_NUM_THREADS`` = cores / workers unless set).

The workers run in sessions of their own, so that Ctrl-C reaches this process only: it passes one
SIGINT to each worker (each marks its running trial failed and stops, exit 130), waits for them and
exits with 130; a second Ctrl-C stops the workers at once (their trials are then recovered as a dead
worker's are). Worker output is relayed line by line with a ``[w<i>]`` prefix; a one-line error that
every worker reports (a bad space, a missing model) is printed once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from evomerge.errors import EvomergeError

__all__ = ["worker_devices", "run_workers"]

ERROR_PREFIX = "evomerge: error: "


def worker_devices(
    workers: int | None, devices: str | None, device: str | None
) -> list[str | None]:
    """The device of each worker: a CUDA device index (as ``CUDA_VISIBLE_DEVICES`` takes it), or
    None for a CPU worker.

    Args:
        workers: ``--workers`` (None: one per ``--devices`` entry).
        devices: ``--devices``, e.g. ``"0,1,2,3"``.
        device: ``--device`` (``cpu`` makes CPU workers; default: CUDA when available).

    Raises:
        EvomergeError: a count below 1, a malformed device list, more GPU workers than GPUs.

    Example:
        >>> worker_devices(None, "0,2", None)
        ['0', '2']
        >>> worker_devices(2, None, "cpu")
        [None, None]
    """
    if devices is not None:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not ids or not all(d.isdigit() for d in ids) or len(set(ids)) != len(ids):
            raise EvomergeError(
                f"--devices: must be distinct CUDA device indices separated by commas, e.g. 0,1,2,3; got {devices!r}"
            )
        if workers is not None and workers != len(ids):
            raise EvomergeError(
                f"--workers {workers} with --devices {devices}: one worker per device; give one of the two"
            )
        if device is not None and not device.startswith("cuda"):
            raise EvomergeError(
                f"--devices with --device {device}: --devices names CUDA devices; for CPU workers use --workers N --device cpu"
            )
        return list(ids)
    if workers is None or workers < 1:
        raise EvomergeError(f"--workers: must be a positive integer, got {workers}")
    import torch

    if (device is not None and device.startswith("cpu")) or (
        device is None and not torch.cuda.is_available()
    ):
        return [None] * workers
    n = torch.cuda.device_count()
    if n == 0:
        raise EvomergeError(
            f"--device {device}: no CUDA device is available (torch.cuda.is_available() is false); use --device cpu"
        )
    if workers > n:
        raise EvomergeError(
            f"--workers {workers}: this host has {n} CUDA device(s); use at most {n}, or --device cpu for CPU workers"
        )
    return [str(i) for i in range(workers)]


def _env(device: str | None, n: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    elif "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return env


def run_workers(
    argv: Sequence[str],
    devices: Sequence[str | None],
    *,
    out: Callable[[str], None] | None = None,
    python: Sequence[str] = (sys.executable, "-m", "evomerge.cli"),
) -> int:
    """Run one ``evomerge search`` worker per device and wait for all of them.

    Args:
        argv: the worker's arguments after ``evomerge``: ``search SPACE [options]`` (without
            ``--workers``/``--devices``/``--device``).
        devices: from :func:`worker_devices`.
        out: where relayed lines go (default: stdout).
        python: the command before ``argv``.

    Returns:
        The exit code: 130 after Ctrl-C, 2 when a worker reported bad input, else the first
        non-zero worker exit code, else 0.
    """
    out = out or (lambda line: print(line, flush=True))
    n = len(devices)
    procs: list[subprocess.Popen[str]] = []
    errors: dict[str, None] = {}
    lock = threading.Lock()

    def relay(i: int, stream: Any) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with lock:
                if line.startswith(ERROR_PREFIX):
                    errors.setdefault(line[len(ERROR_PREFIX) :])
                else:
                    out(f"[w{i}] {line}")

    interrupts = [0]

    def on_signal(signum: int, frame: Any) -> None:
        interrupts[0] += 1
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if interrupts[0] == 1 else signal.SIGTERM)
        if interrupts[0] == 1:
            out(
                f"evomerge: stopping {n} worker(s) (their running trials are marked failed); Ctrl-C again to stop them at once"
            )

    restore = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    relays = []
    try:
        for i, dev in enumerate(devices):
            cmd = [*python, *argv, "--device", "cpu" if dev is None else "cuda", "--as-worker"]
            p = subprocess.Popen(
                cmd,
                env=_env(dev, n),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            procs.append(p)
            t = threading.Thread(target=relay, args=(i, p.stdout), daemon=True)
            t.start()
            relays.append(t)
        codes = [p.wait() for p in procs]
        for t in relays:
            t.join(timeout=5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s, h in restore.items():
            signal.signal(s, h)
    for e in errors:
        print(ERROR_PREFIX + e, file=sys.stderr, flush=True)
    if interrupts[0]:
        return 130
    if errors or 2 in codes:
        return 2
    return next((c for c in codes if c), 0)

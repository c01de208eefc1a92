"""Timing utilities shared by every benchmark section.

The rule everywhere: a row and its baseline are measured in the same run,
interleaved round by round (``interleave``), after warm-up, and summarised
by their median and p99 (``summary``), so slow drift and noisy neighbours on
this small machine hit both sides alike.

Example::

    res = interleave({"a": fa, "b": fb}, rounds=10, per_round=5, warmup=3)
    res["a"]["median_s"], res["a"]["p99_s"]
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Timed", "interleave", "summary", "machine", "versions", "vm_hwm", "Unavailable"]


class Timed(float):
    """Returned by a callable given to :func:`interleave` that times itself
    (e.g. to leave its own teardown out): the sample is this value."""


class Unavailable(Exception):
    """A row that cannot be measured here; the text says why."""


def summary(samples: list[float]) -> dict[str, Any]:
    """Median, p99, min, max, mean and n of a list of seconds."""
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {
        "n": len(s),
        "median_s": statistics.median(s),
        "p99_s": p99,
        "min_s": s[0],
        "max_s": s[-1],
        "mean_s": statistics.fmean(s),
    }


QUIET_PROBE_S = 0.002  # how long each check of the process's CPU lasts
QUIET_CPU_S = 0.0005  # under this much CPU in a probe, the process is idle
QUIET_MAX_S = 0.2  # never wait longer than this for it


def quiet(gap_s: float) -> float:
    """Sleep ``gap_s``, then on (up to :data:`QUIET_MAX_S`) while a thread of
    this process still uses CPU; returns the seconds waited. An in-process
    session with onnxruntime's default options keeps its pool spinning after
    a run: measured on this project's VM after five MobileNetV2 b4 runs, 38.6
    ms of CPU (two threads) in the 50 ms that followed, and this pause
    waited 22-26 ms after such a block against 22 ms after one with
    spinning off (stop 34): a fixed 20 ms could leave a few ms of that spin
    running into the next block. (It did not explain the slow first calls
    of the row after that session; see :func:`interleave`.)"""
    t0 = time.perf_counter()
    time.sleep(gap_s)
    while time.perf_counter() - t0 < QUIET_MAX_S:
        c0 = time.process_time()
        time.sleep(QUIET_PROBE_S)
        if time.process_time() - c0 < QUIET_CPU_S:
            break
    return time.perf_counter() - t0


def interleave(
    fns: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    per_round: int = 1,
    warmup: int = 2,
    budget_s: float | None = None,
    gap_s: float = 0.005,
) -> dict[str, dict[str, Any]]:
    """Time each callable, alternating between them round by round.

    Each round runs every callable ``per_round`` times in turn, in an order
    that changes each round: with two sides they alternate who goes first;
    with more, each round is a fresh permutation (seeded, so a run repeats),
    so that no side follows the same neighbour round after round. (A
    rotation did that: in the latency section the vault's own row followed
    onnxruntime's default session every round, and the first calls of a
    block after it ran 4-5 ms slower on MobileNetV2 b4, wherever that row
    was put, and still with the pause below; stop 34.) ``warmup`` untimed calls
    of each come first. With ``budget_s`` the rounds
    stop early once that much wall time is spent (at least 3 rounds run).
    Before each block an untimed pause (:func:`quiet`: at least ``gap_s``, and
    on until this process has stopped using CPU) lets the previous side's
    thread pools go idle on this small machine, so no side is timed while
    the other still burns a core.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    t_start = time.perf_counter()
    pc = time.perf_counter
    shuffle = random.Random(len(names)).shuffle
    for r in range(rounds):
        if len(names) <= 2:
            order = names[r % len(names) :] + names[: r % len(names)]
        else:
            order = list(names)
            shuffle(order)
        for n in order:
            f = fns[n]
            out = samples[n]
            if gap_s:
                quiet(gap_s)
            for _ in range(per_round):
                t = pc()
                ret = f()
                dt = pc() - t
                out.append(float(ret) if isinstance(ret, Timed) else dt)
                del ret
        if budget_s is not None and r >= 2 and pc() - t_start > budget_s:
            break
    return {n: {**summary(v), "samples_s": v} for n, v in samples.items()}


def vm_hwm(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a live process, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What this run ran on: CPU, cores, memory, kernel, load, BLAS env."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:
        git = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(__file__),
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_bytes": _mem_total(),
        "loadavg_at_start": load,
        "python": sys.version.split()[0],
        "git_commit": git,
        "env": {
            k: os.environ[k]
            for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")
            if k in os.environ
        },
        "gpu": gpu_available()[1],
    }


def gpu_available() -> tuple[bool, str]:
    """(True, provider) when onnxruntime-gpu with CUDA is usable, else (False, reason)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            False,
            "no CUDAExecutionProvider in onnxruntime (CPU-only build / no GPU on this machine)",
        )
    return True, "CUDAExecutionProvider"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for mod in ("numpy", "onnx", "onnxruntime", "zmq", "cryptography", "msgpack", "vault"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None)
        except Exception:  # noqa: BLE001 - a missing module is a fact to record
            out[mod] = None
    try:
        import zmq

        out["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    return out


def ort_session(model: bytes | str, *, default_options: bool = False) -> Any:
    """The in-process baseline session, on the CPU.

    By default it gets exactly the worker's SessionOptions
    (``worker.runtime.session_options()``: thread pools spinning within a
    run and 50 us after it, logs quiet), so both sides run onnxruntime the
    same way and the difference is the vault's. ``default_options=True``
    gives onnxruntime's defaults (spinning on, unbounded), as a user's plain
    session would have.
    """
    import onnxruntime as ort

    so = None
    if not default_options:
        try:
            from worker.runtime import session_options

            so = session_options()
        except Exception:  # noqa: BLE001 - worker absent: the same thread policy
            from vault.core.ortthreads import apply_spin_policy

            so = ort.SessionOptions()
            apply_spin_policy(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def die_with_parent() -> None:
    """``preexec_fn`` for helper processes: SIGKILL them when the benchmark dies
    (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves nothing spinning."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass

"""How onnxruntime's thread pools wait for work, in every session the project
builds (a worker's, and a hybrid head's in the caller's process).

A pool thread that finishes its share of a parallel section either sleeps
or spin-waits for the next one. onnxruntime's default spins without a bound
that matters here: an idle pool burned about 40 ms of CPU after each run on
this project's 2-core hosts (`tests/unit/worker/test_ortthreads.py`
measures it), taking the cores that a worker's I/O and its caller need (it
tripled a small model's round trip). Spinning off, every parallel section
wakes its threads from sleep: GPT-2 with past ran in 625 us instead of
374 us back to back in-process.

Since onnxruntime 1.26 a spin can be bounded
(``session.intra_op.spin_duration_us``): the threads stay hot from one
parallel section of a run to the next and sleep :data:`SPIN_BOUND_US` after
the run's last. Measured through a local worker (docs/benchmarks.md, "Stop
35"): up to 30 % faster a call on the transformers, 5-15 % on MobileNetV2,
the batch-1 MLP within its noise (slower in two of six runs, by up to 10
%); throughput within noise. On an
older onnxruntime (which ignores the key, so its spin would be unbounded)
the policy stays spinning off.

Example::

    so = ort.SessionOptions()
    apply_spin_policy(so)               # the project's policy
    apply_spin_policy(so, allow=False)  # no spinning at all
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["SPIN_BOUND_US", "apply_spin_policy", "bounded_spin_supported", "spin_entries"]

SPIN_BOUND_US = 50  # 20, 50 and 150 measured alike; 10 lost part of the gain
_FIRST_BOUNDED = (1, 26)  # the first onnxruntime with session.*.spin_duration_us


def bounded_spin_supported(version: str | None = None) -> bool:
    """Whether this onnxruntime (or ``version``) honours a spin bound."""
    if version is None:
        import onnxruntime as ort

        version = str(ort.__version__)
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:  # a version this does not understand: the safe policy
        return False
    return (int(m[1]), int(m[2])) >= _FIRST_BOUNDED


def spin_entries(allow: bool | None = None, version: str | None = None) -> list[tuple[str, str]]:
    """The session config entries of a policy. ``allow``: None, the project's
    (spinning bounded to :data:`SPIN_BOUND_US` where onnxruntime can bound it,
    else off); False, off; True, onnxruntime's own unbounded spinning."""
    if allow is None:
        if not bounded_spin_supported(version):
            allow = False
        else:
            bound = str(SPIN_BOUND_US)
            return [
                ("session.intra_op.allow_spinning", "1"),
                ("session.inter_op.allow_spinning", "1"),
                ("session.intra_op.spin_duration_us", bound),
                ("session.inter_op.spin_duration_us", bound),
            ]
    flag = "1" if allow else "0"
    return [("session.intra_op.allow_spinning", flag), ("session.inter_op.allow_spinning", flag)]


def apply_spin_policy(so: Any, allow: bool | None = None) -> None:
    """Set :func:`spin_entries` on an ``onnxruntime.SessionOptions``."""
    for key, value in spin_entries(allow):
        so.add_session_config_entry(key, value)

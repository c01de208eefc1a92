"""onnxruntime's thread pools as the project's sessions set them: hot within a
run, idle after it (vault/core/ortthreads.py)."""

from __future__ import annotations

import os
import statistics
import threading

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.waiting import wait_for
from vault.core.errors import ConfigError
from vault.core.ortthreads import SPIN_BOUND_US, bounded_spin_supported, spin_entries
from worker.runtime import session_options


def _matmul_model() -> bytes:
    """One MatMul big enough that onnxruntime splits it over its pool."""
    w = numpy_helper.from_array(np.random.default_rng(0).random((512, 512), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 512])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _pool_cpu_s() -> float:
    """CPU seconds run by this process's threads other than the calling one
    (the kernel's per-thread count, in ns): what a session's pool spends."""
    me, total = threading.get_native_id(), 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e9


def _spent_until_idle() -> float:
    """The pool's CPU seconds from now until its count holds over five polls."""
    start = _pool_cpu_s()
    seen = [start, 0]  # the last count, and how many polls it held

    def idle() -> bool:
        now = _pool_cpu_s()
        seen[:] = [now, seen[1] + 1] if now == seen[0] else [now, 0]
        return seen[1] >= 5

    wait_for(idle, "the session's pool went idle after its run")
    return seen[0] - start


def _cpu_after_a_run(so: ort.SessionOptions) -> float:
    """CPU seconds the session's pool spends after a run, from the run's end
    until it is idle (its count unchanged over five polls; median of three):
    what it burns waiting for work that does not come."""
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(_matmul_model(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((256, 512), np.float32)
    for _ in range(3):
        sess.run(None, {"x": x})
    spent = []
    for _ in range(3):
        sess.run(None, {"x": x})
        spent.append(_spent_until_idle())
    return statistics.median(spent)


def test_a_worker_session_pool_goes_idle_after_a_run_where_a_default_one_spins() -> None:
    ours = _cpu_after_a_run(session_options())
    # control: onnxruntime's default session keeps its pool spinning after the
    # run (40-47 ms of CPU on a quiet 2-core host, 37-39 ms with four busy
    # loops beside it; the bounded pool 0-0.1 ms either way)
    default = _cpu_after_a_run(ort.SessionOptions())
    assert default > 0.005, f"control: the default pool burned only {default * 1e3:.1f} ms idle"
    assert ours < min(0.005, default / 4), (
        f"the worker's pool burned {ours * 1e3:.1f} ms of CPU while idle "
        f"(onnxruntime's default: {default * 1e3:.1f} ms)"
    )


def test_the_policy_spins_within_a_run_only_where_onnxruntime_bounds_it() -> None:
    bounded = dict(spin_entries(version="1.26.0"))
    assert bounded["session.intra_op.allow_spinning"] == "1"
    assert bounded["session.intra_op.spin_duration_us"] == str(SPIN_BOUND_US)
    assert bounded["session.inter_op.spin_duration_us"] == str(SPIN_BOUND_US)
    assert dict(spin_entries(version="2.0.1")) == bounded
    # an onnxruntime that ignores the bound would spin without one: off there
    for old in ("1.25.1", "1.18.0", "nightly"):
        assert dict(spin_entries(version=old)) == {
            "session.intra_op.allow_spinning": "0",
            "session.inter_op.allow_spinning": "0",
        }, old
    assert bounded_spin_supported("1.26.0.dev20260101") and not bounded_spin_supported("0.9")
    # the installed onnxruntime gets what its version says
    so = session_options()
    want = "1" if bounded_spin_supported() else "0"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == want


@pytest.mark.parametrize(("allow", "flag"), [(0, "0"), (1, "1")])
def test_allow_spinning_turns_it_off_or_unbounds_it(allow: int, flag: str) -> None:
    entries = dict(spin_entries(bool(allow)))
    assert entries == {
        "session.intra_op.allow_spinning": flag,
        "session.inter_op.allow_spinning": flag,
    }
    so = session_options({"allow_spinning": allow})
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == flag


def test_on_off_options_read_strings_as_a_config_file_gives_them() -> None:
    off = session_options({"allow_spinning": "0"})
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    unpacked = session_options({"prepack": "0"})
    assert unpacked.get_session_config_entry("session.disable_prepacking") == "1"
    for bad in ("yes", 2, 0.0, "false"):
        with pytest.raises(ConfigError, match="must be 0 or 1"):
            session_options({"allow_spinning": bad})

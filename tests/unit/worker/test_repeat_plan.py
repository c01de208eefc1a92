"""What a worker keeps of a request for the next one (vault.core.protocol.RepeatPlan):
only on a thread that serves one caller's connection, and only what the
protocol names."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper

from vault.core.protocol import (
    PROTOCOL_VERSION,
    decode_tensors,
    encode_tensors,
    pack_header,
    unpack_header,
)
from worker.lease import LeaseKeeper
from worker.ops import Service
from worker.runtime import Pipeline


def _service() -> Service:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    keeper = LeaseKeeper(None, renew=None, on_end=lambda: None, unsafe_no_lease=True)
    return Service(Pipeline([model.SerializeToString()]), keeper, info={"model_id": "m"},
                   hardening={})  # fmt: skip


def _request(arr: np.ndarray, rid: int, **extra: Any) -> list[Any]:
    descs, frames = encode_tensors({"x": arr})
    descs = [{**d, **extra} for d in descs]
    header = {"v": PROTOCOL_VERSION, "op": "compute", "id": rid, "tensors": descs}
    return [pack_header(header), *[bytes(f) for f in frames]]


def _answer(reply: list[Any]) -> np.ndarray:
    hdr = unpack_header(reply[0])
    assert hdr["ok"] is True, hdr
    return decode_tensors(hdr["tensors"], reply[1:])["y"]


def test_a_thread_of_many_callers_keeps_no_plan() -> None:
    """The ZeroMQ fronts (and so the service's tenants) share threads: a
    plan there would let a request's timing say whether the one before it,
    another caller's, had the same shapes."""
    svc = _service()
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    for i in range(3):
        np.testing.assert_array_equal(_answer(svc.handle(_request(a, i))), -a)
    assert svc._plans.plan is None and svc._plans.seen is None
    for i in range(2):  # one caller's connection: kept once the same descriptors came twice
        np.testing.assert_array_equal(_answer(svc.handle_own(_request(a, 9 + i))), -a)
    assert svc._plans.plan is not None


def test_a_plan_keeps_only_what_the_protocol_names() -> None:
    """Keys the decoder ignores are answered, never planned: a plan that held
    them would keep a sender's junk (up to a header's 1 MiB) after its call;
    and the descriptors kept to compare with the next request's are kept only
    from a small header."""
    svc = _service()
    a = np.ones((1, 4), np.float32)
    junk = [[] for _ in range(1000)]
    for i in range(2):
        np.testing.assert_array_equal(_answer(svc.handle_own(_request(a, 1 + i, junk=junk))), -a)
    assert svc._plans.plan is None
    for i in range(2):
        np.testing.assert_array_equal(_answer(svc.handle_own(_request(a, 3 + i))), -a)
    assert svc._plans.plan is not None
    # the same descriptors with junk added no longer compare equal: checked in full
    b = np.full((1, 4), 3.0, np.float32)
    np.testing.assert_array_equal(_answer(svc.handle_own(_request(b, 5, junk=junk))), -b)
    assert svc._plans.plan is None
    big = "x" * 100_000  # a header of about 100 KB: answered, not kept
    np.testing.assert_array_equal(_answer(svc.handle_own(_request(b, 6, junk=big))), -b)
    assert svc._plans.plan is None and svc._plans.seen is None


def test_another_shape_after_a_plan_is_checked_and_answered() -> None:
    svc = _service()
    for rows in (1, 1, 3, 3, 2):
        a = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
        np.testing.assert_array_equal(_answer(svc.handle_own(_request(a, rows))), -a)
    bad = _request(np.ones((2, 5), np.float32), 7)  # a fixed dimension broken, after a plan
    hdr = unpack_header(svc.handle_own(bad)[0])
    assert hdr["ok"] is False and hdr["error"]["code"] == "bad_input", hdr

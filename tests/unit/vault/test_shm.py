"""Large tensors through shared memory with a local worker: same results as
frames and as plain onnxruntime, bounds checked by the worker, fallback to
frames when slots run out or tensors do not fit."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.raw import Raw, raw_local, raw_zmq
from tests.sealed import Sealed, open_sealed, seal_for_test
from vault.client import Model
from vault.core.protocol import PROTOCOL_VERSION, encode_tensors, pack_header, unpack_header


def _model() -> object:
    """big [1,3,H,W] and small [2] in; big (Relu) and small (ReduceSum) out."""
    big = helper.make_tensor_value_info("big", TensorProto.FLOAT, [1, 3, "H", "W"])
    small = helper.make_tensor_value_info("small", TensorProto.FLOAT, [2])
    out_big = helper.make_tensor_value_info("out_big", TensorProto.FLOAT, [1, 3, "H", "W"])
    out_small = helper.make_tensor_value_info("out_small", TensorProto.FLOAT, [])
    nodes = [
        helper.make_node("Relu", ["big"], ["relu"]),
        helper.make_node("ReduceSum", ["small"], ["out_small"], keepdims=0),
        helper.make_node("Add", ["relu", "out_small"], ["out_big"]),
    ]
    m = helper.make_model(
        helper.make_graph(nodes, "g", [big, small], [out_big, out_small]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    return seal_for_test(tmp_path_factory.mktemp("shm"), _model(), name="shm")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(sealed: Sealed) -> Iterator[Model]:
    m = open_sealed(sealed, shm_bytes=16 << 20)  # 4 slots of 4 MiB
    try:
        yield m
    finally:
        m.close()


def _reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(_model().SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    return dict(zip(["out_big", "out_small"], sess.run(None, feeds)))


def _feeds(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "big": rng.standard_normal((1, 3, h, w)).astype(np.float32),
        "small": rng.standard_normal(2).astype(np.float32),
    }


@pytest.mark.parametrize("hw", [(8, 8), (256, 256), (512, 256), (700, 700)])
def test_results_match_plain_onnxruntime(model: Model, hw: tuple[int, int]) -> None:
    """Below the threshold (frames), in a slot, filling it, and too big for one (frames)."""
    assert model._localw is not None and model._localw.arena is not None
    feeds = _feeds(*hw)
    got = model.compute(feeds)
    want = _reference(feeds)
    np.testing.assert_array_equal(got["out_big"], want["out_big"])
    np.testing.assert_allclose(got["out_small"], want["out_small"], rtol=1e-6)
    # results are the caller's own copies, not views into a slot reused later
    again = model.compute(_feeds(*hw, seed=1))
    np.testing.assert_array_equal(got["out_big"], want["out_big"])
    assert not np.array_equal(again["out_big"], got["out_big"])


def test_frames_only_model_gives_the_same_answer(sealed: Sealed, model: Model) -> None:
    feeds = _feeds(300, 300, seed=3)
    with open_sealed(sealed, shm_bytes=0) as plain:
        assert plain._localw is not None and plain._localw.arena is None
        np.testing.assert_array_equal(
            plain.compute(feeds)["out_big"], model.compute(feeds)["out_big"]
        )


def test_many_threads_more_than_slots(model: Model) -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(10):
                feeds = _feeds(256, 256, seed=seed * 100 + i)
                np.testing.assert_array_equal(
                    model.compute(feeds)["out_big"], _reference(feeds)["out_big"]
                )
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("front", [raw_zmq, raw_local], ids=["zmq", "local"])
def test_out_of_bounds_shared_tensors_are_refused(
    model: Model, front: Callable[[Model], contextlib.AbstractContextManager[Raw]]
) -> None:
    arena = model._localw.arena  # type: ignore[union-attr]
    assert arena is not None
    small_desc, small_frames = encode_tensors({"small": np.ones(2, np.float32)})
    big = {"name": "big", "dtype": "float32", "shape": [1, 3, 8, 8]}
    n = 3 * 8 * 8 * 4
    region = {"offset": 0, "size": arena.slot_size}
    cases = [
        ({**big, "shm": [arena.slot_size, n]}, region),  # outside its slot
        ({**big, "shm": [-64, n]}, region),
        ({**big, "shm": [0, n]}, {"offset": arena.size, "size": 4096}),  # region outside the arena
        ({**big, "shm": [0, n]}, {"offset": 0, "size": arena.size * 2}),
        ({**big, "shm": [0, n - 4]}, region),  # size does not match the shape
        ({**big, "shm": "everywhere"}, region),
    ]
    with front(model) as call:  # the raw transport: frames the client would never build
        for i, (desc, reg) in enumerate(cases):
            header = {"v": PROTOCOL_VERSION, "op": "compute", "id": 100 + i,
                      "tensors": [desc, *small_desc], "shm": reg}  # fmt: skip
            reply = unpack_header(call([pack_header(header), *[bytes(f) for f in small_frames]])[0])
            assert reply["ok"] is False and reply["error"]["code"] == "protocol", reply
    feeds = _feeds(64, 64)
    np.testing.assert_array_equal(model.compute(feeds)["out_big"], _reference(feeds)["out_big"])


def test_arena_is_not_a_file(model: Model, tmp_path: Path) -> None:
    """The shared memory is an anonymous memfd: nothing in the private directory."""
    import os

    w = model._localw
    assert w is not None and w.arena is not None
    assert os.readlink(f"/proc/self/fd/{w.arena.fd}").startswith("/memfd:vault-tensors")
    assert all(name.endswith(".sock") for name in os.listdir(w.dir))


def test_a_timed_out_call_never_gives_its_slot_back(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker may still write a late answer into that slot: reusing it
    could hand one call's outputs to another."""
    import vault

    arena = model._localw.arena  # type: ignore[union-attr]
    assert arena is not None
    free_before = list(arena._free)

    def late(*args: object, **kw: object) -> object:
        raise vault.WorkerTimeoutError("no answer")

    monkeypatch.setattr(model, "_request", late)
    with pytest.raises(vault.WorkerTimeoutError):
        model.compute(_feeds(256, 256))
    (lost,) = set(free_before) - set(arena._free)
    with pytest.raises(vault.WorkerTimeoutError):
        model.compute(_feeds(8, 8))  # small: no slot taken, none lost
    assert sorted(arena._free) == sorted(set(free_before) - {lost})
    arena.release(lost)  # hand it back by hand: the other tests share this model


@pytest.mark.parametrize("front", [raw_zmq, raw_local], ids=["zmq", "local"])
def test_a_repeated_request_is_checked_and_read_afresh(
    model: Model, front: Callable[[Model], contextlib.AbstractContextManager[Raw]]
) -> None:
    """A worker thread keeps what it checked of the last request's
    descriptors (vault.core.protocol.RepeatPlan): the next request with the
    same ones still reads its own bytes, and one that differs in anything,
    or whose frame does not match them, is checked in full and refused."""
    arena = model._localw.arena  # type: ignore[union-attr]
    assert arena is not None
    slot = arena.acquire()
    assert slot is not None
    try:
        region = arena.region(slot)

        def request(feeds: dict[str, np.ndarray], rid: int, **change: object) -> list[bytes]:
            region.cursor = region.start
            descs, frames = encode_tensors(feeds, region, min_bytes=4096)
            if change:
                descs = [{**d, **change} if d["name"] == "small" else d for d in descs]
            header = {"v": PROTOCOL_VERSION, "op": "compute", "id": rid, "tensors": descs,
                      "shm": region.to_wire()}  # fmt: skip
            return [pack_header(header), *[bytes(f) for f in frames]]

        def answer(reply: list[bytes]) -> dict[str, np.ndarray]:
            hdr = unpack_header(reply[0])
            assert hdr["ok"] is True, hdr
            from vault.core.protocol import decode_tensors

            return decode_tensors(hdr["tensors"], reply[1:], region, copy=True, bound=False)

        with front(model) as call:
            for seed in range(4):  # the same descriptors each time, other bytes
                feeds = _feeds(32, 32, seed)
                got = answer(call(request(feeds, seed)))
                want = _reference(feeds)
                np.testing.assert_array_equal(got["out_big"], want["out_big"])
                np.testing.assert_allclose(got["out_small"], want["out_small"], rtol=1e-6)
            feeds = _feeds(32, 32, 9)
            bad = request(feeds, 10)
            bad[1] = bad[1][:4]  # "small"'s frame, shorter than its shape
            refused = unpack_header(call(bad)[0])
            assert refused["ok"] is False and refused["error"]["code"] == "protocol", refused
            # a dimension the model fixes ([2]): refused from the header, as on a first call
            three = {"small": np.ones(3, np.float32), "big": feeds["big"]}
            refused = unpack_header(call(request(three, 11))[0])
            assert refused["ok"] is False and refused["error"]["code"] == "bad_input", refused
            refused = unpack_header(call(request(feeds, 12, dtype="float64"))[0])
            assert refused["ok"] is False and refused["error"]["code"] == "bad_input", refused
            got = answer(call(request(feeds, 13)))
            np.testing.assert_array_equal(got["out_big"], _reference(feeds)["out_big"])
    finally:
        arena.release(slot)


def _many_outputs(count: int, shape: list[int]) -> object:
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, shape) for i in range(count)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, shape) for i in range(count)]
    nodes = [helper.make_node("Neg", [f"x{i}"], [f"y{i}"]) for i in range(count)]
    m = helper.make_model(
        helper.make_graph(nodes, "many", ins, outs), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    return m


def test_many_small_outputs_are_the_callers_own(tmp_path: Path) -> None:
    """Small tensors that cross in shared memory together (a GPT-2 step's
    past and present) come out of the slot in one copy per run of them: each
    result is still right, writable, independent of the others and of the
    next call, which reuses the slot."""
    shape = [1, 12, 32, 16]  # 24 KiB each: 12 of them go through shared memory
    s = seal_for_test(tmp_path, _many_outputs(12, shape), name="many")  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    with open_sealed(s, shm_bytes=16 << 20) as m:
        calls = []
        for _ in range(3):
            feeds = {f"x{i}": rng.standard_normal(shape).astype(np.float32) for i in range(12)}
            calls.append((feeds, m.compute(feeds)))
        for feeds, got in calls:  # earlier answers are intact after later calls
            assert sorted(got) == sorted(f"y{i}" for i in range(12))
            for i in range(12):
                np.testing.assert_array_equal(got[f"y{i}"], -feeds[f"x{i}"])
        feeds, got = calls[-1]
        assert all(a.flags.writeable for a in got.values())
        got["y0"][...] = 7.0  # writing one result leaves the others as they were
        np.testing.assert_array_equal(got["y1"], -feeds["x1"])
        np.testing.assert_array_equal(got["y11"], -feeds["x11"])
        assert (got["y0"] == 7.0).all()

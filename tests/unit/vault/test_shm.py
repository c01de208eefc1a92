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

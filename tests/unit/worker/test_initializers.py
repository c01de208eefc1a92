"""The decrypted buffer is the only copy of the weights: onnxruntime runs on it
in place, and it is wiped when the sessions end, not before."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vault.core.errors import ComputeError
from vault.core.package import Plaintext, _parse_index, build_plaintext
from vault.sealing import _externalise
from worker.initializers import external_initializers, zero_copy_graph
from worker.runtime import Pipeline

N = 512  # the bias is 2 KB: above sealing's externalisation threshold


def _sealed_layout(
    weights: dict[str, np.ndarray], nodes: list, out: str, width: int = N
) -> Plaintext:
    """A plaintext laid out exactly as sealing lays it out (graph + one weights file)."""
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blob = _externalise(model, "m.weights")
    buf = build_plaintext([("pipeline", model.SerializeToString())], [("m.weights", blob)])
    return Plaintext(buf, _parse_index(buf))


def _bias_model() -> tuple[Plaintext, np.ndarray]:
    # Add reads its initializer as is (no pre-packing), so a change in the
    # buffer shows in the result exactly when onnxruntime did not copy it
    b = np.arange(N, dtype=np.float32).reshape(1, N)
    w = np.eye(N, dtype=np.float32) * 2
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    return _sealed_layout({"w": w, "b": b}, nodes, "y"), b


def test_views_cover_every_external_initializer_without_a_copy() -> None:
    plain, b = _bias_model()
    views = external_initializers(bytes(plain.graphs[0]), plain.files)
    assert set(views) == {"w", "b"}
    np.testing.assert_array_equal(views["b"], b)
    buf_start = np.frombuffer(plain.files["m.weights"], np.uint8).ctypes.data
    assert buf_start <= views["b"].ctypes.data < buf_start + len(plain.files["m.weights"])
    del views
    plain.release()


def test_onnxruntime_runs_on_the_decrypted_buffer_in_place() -> None:
    plain, b = _bias_model()
    pipe = Pipeline(plain.graphs, plain.files, owner=plain)
    plain.wipe_graphs()  # as the worker does: the architecture goes, the weights stay
    x = np.ones((1, N), np.float32)
    np.testing.assert_array_equal(pipe.run({"x": x})["y"], 2 * x + b)
    # the same memory: a change in the plaintext buffer is what the session computes with
    bias = np.frombuffer(plain.files["m.weights"], np.float32)
    at = int(np.flatnonzero(bias == N - 1.0)[-1])
    bias[at] = 1000.0
    assert pipe.run({"x": x})["y"][0, N - 1] == 1002.0
    del bias
    pipe.close()
    with pytest.raises(ComputeError):
        pipe.run({"x": x})


def test_the_buffer_is_wiped_when_the_sessions_end_not_before() -> None:
    plain, _ = _bias_model()
    buf = plain._buf  # noqa: SLF001 - the test checks the bytes themselves
    pipe = Pipeline(plain.graphs, plain.files, owner=plain)
    plain.wipe_graphs()
    assert any(buf)  # the weights are still there while the session serves
    pipe.close()
    assert not any(buf)


def test_close_during_a_run_wipes_after_the_run_finishes() -> None:
    plain, b = _bias_model()
    buf = plain._buf  # noqa: SLF001
    pipe = Pipeline(plain.graphs, plain.files, owner=plain)
    x = np.ones((1, N), np.float32)
    entered, release = threading.Event(), threading.Event()
    real = pipe._run  # noqa: SLF001

    def slow_run(*a: object) -> object:
        entered.set()
        release.wait(10)
        return real(*a)  # type: ignore[arg-type]

    pipe._run = slow_run  # type: ignore[method-assign]  # noqa: SLF001
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(pipe.run({"x": x})))
    t.start()
    assert entered.wait(10)
    pipe.close()  # the lease ends mid-call
    assert any(buf)  # not wiped under a running call
    release.set()
    t.join(10)
    np.testing.assert_array_equal(got["y"], 2 * x + b)  # the call saw intact weights
    assert not any(buf)  # and the last call out wiped them


def test_a_graph_the_walker_cannot_serve_falls_back_to_the_copying_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a tiny external tensor (< 128 bytes) is refused as caller memory by
    # onnxruntime: all or nothing, the in-memory-files route (a copy) serves it
    monkeypatch.setattr("vault.sealing.EXTERNALISE_THRESHOLD", 0)
    t = np.full((1, 16), 3, np.float32)
    plain = _sealed_layout({"t": t}, [helper.make_node("Add", ["x", "t"], ["y"])], "y", width=16)
    model = onnx.load_from_string(bytes(plain.graphs[0]))
    assert model.graph.initializer[0].data_location == TensorProto.EXTERNAL
    assert zero_copy_graph(bytes(plain.graphs[0]), plain.files) is None
    buf = plain._buf  # noqa: SLF001
    pipe = Pipeline(plain.graphs, plain.files, owner=plain)
    x = np.ones((1, 16), np.float32)
    np.testing.assert_array_equal(pipe.run({"x": x})["y"], x + t)
    pipe.close()
    assert not any(buf)


def test_unparseable_graph_bytes_are_left_to_onnxruntime() -> None:
    assert zero_copy_graph(b"\xff\xff\xff", {"m.weights": memoryview(bytearray(8))}) is None


def test_a_conv_graph_takes_the_copying_route_and_runs() -> None:
    # onnxruntime rewrites Conv weights itself (NCHWc layout, folding), reading
    # the graph's own tensor: in place would fail, so it is not tried
    w = np.full((8, 4, 3, 3), 0.5, np.float32)  # 1.1 KB: externalised
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blob = _externalise(model, "c.weights")
    buf = build_plaintext([("pipeline", model.SerializeToString())], [("c.weights", blob)])
    plain = Plaintext(buf, _parse_index(buf))
    assert external_initializers(bytes(plain.graphs[0]), plain.files)  # external, servable...
    assert zero_copy_graph(bytes(plain.graphs[0]), plain.files) is None  # ...but not tried
    pipe = Pipeline(plain.graphs, plain.files, owner=plain)
    y = pipe.run({"x": np.ones((1, 4, 8, 8), np.float32)})["y"]
    assert y[0, 0, 4, 4] == 18.0  # 4 channels x 9 taps x 0.5
    pipe.close()
    assert not any(buf)

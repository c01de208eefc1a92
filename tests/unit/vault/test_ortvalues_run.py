"""``vault.core.ortvalues.run`` (the caller's side of the hybrid, ``vault
split``'s profile and check): a bfloat16, float8 or int4 output comes back
through ``run_with_ort_values``; a sequence, map or absent optional beside it
must come from that same run, not from a second one."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from vault.core.ortvalues import run


def _random_model() -> bytes:
    """One random draw a run, given twice: as bfloat16 and inside a sequence."""
    nodes = [
        helper.make_node("RandomNormal", [], ["r"], shape=[4], dtype=TensorProto.FLOAT),
        helper.make_node("Add", ["r", "x"], ["rx"]),
        helper.make_node("Cast", ["rx"], ["wide"], to=TensorProto.BFLOAT16),
        helper.make_node("SequenceConstruct", ["rx"], ["seq"]),
        helper.make_node("Identity", ["rx"], ["plain"]),
    ]
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, [4])
    g = helper.make_graph(
        nodes, "draws",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("wide", TensorProto.BFLOAT16, [4]), seq,
         helper.make_tensor_value_info("plain", TensorProto.FLOAT, [4])],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m.SerializeToString()


def test_a_wide_output_beside_a_sequence_comes_from_one_run() -> None:
    sess = ort.InferenceSession(_random_model(), providers=["CPUExecutionProvider"])
    x = np.zeros(4, np.float32)
    for _ in range(5):
        out = run(sess, {"x": x})
        assert out["wide"].dtype == ml_dtypes.bfloat16
        assert isinstance(out["seq"], list) and len(out["seq"]) == 1
        # the same draw in all three: one run (two runs draw twice and differ)
        np.testing.assert_array_equal(out["seq"][0], out["plain"])
        np.testing.assert_array_equal(
            out["wide"], out["plain"].astype(ml_dtypes.bfloat16)
        )  # fmt: skip


def test_control_two_runs_of_the_same_model_draw_differently() -> None:
    sess = ort.InferenceSession(_random_model(), providers=["CPUExecutionProvider"])
    x = np.zeros(4, np.float32)
    a = sess.run(["plain"], {"x": x})[0]
    b = sess.run(["plain"], {"x": x})[0]
    assert not np.array_equal(a, b)  # what would give a second run away


def test_outputs_asked_in_any_order_and_alone() -> None:
    sess = ort.InferenceSession(_random_model(), providers=["CPUExecutionProvider"])
    x = np.zeros(4, np.float32)
    out = run(sess, {"x": x}, ["seq", "wide"])
    assert list(out) == ["seq", "wide"]
    np.testing.assert_array_equal(out["wide"], out["seq"][0].astype(ml_dtypes.bfloat16))
    only = run(sess, {"x": x}, ["seq"])  # no wide output asked: the plain run
    assert isinstance(only["seq"], list) and only["seq"][0].shape == (4,)


def test_a_wide_output_beside_a_zipmap_gives_its_maps_as_run_does() -> None:
    nodes = [
        helper.make_node(
            "ZipMap", ["x"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[3, 7]
        ),  # fmt: skip
        helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.BFLOAT16),
    ]
    g = helper.make_graph(
        nodes, "zipmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_value_info("probs", helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
                TensorProto.FLOAT, [])))),
         helper.make_tensor_value_info("wide", TensorProto.BFLOAT16, [None, 2])],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)  # fmt: skip
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    out = run(sess, {"x": x})
    assert out["probs"] == sess.run(["probs"], {"x": x})[0]  # as onnxruntime's run gives it
    assert out["probs"] == [{3: 0.25, 7: 0.75}, {3: 0.5, 7: 0.5}]
    np.testing.assert_array_equal(out["wide"], x.astype(ml_dtypes.bfloat16))

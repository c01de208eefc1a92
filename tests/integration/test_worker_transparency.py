"""Transparency: a sealed model served by the worker answers exactly what plain
in-process onnxruntime answers, for dynamic shapes, several inputs and
outputs, control flow, unusual dtypes and the models shipped in the onnx wheel."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.sealed import open_sealed, seal_for_test
from vault.core.errors import SealError


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] | None = None,
           opset: int = 17) -> onnx.ModelProto:  # fmt: skip
    g = helper.make_graph(nodes, "t", inputs, outputs, inits or [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _plain(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _same(
    tmp: Path, m: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]], name: str
) -> None:
    s = seal_for_test(tmp, m, name=name)
    with open_sealed(s) as model:
        for feeds in feeds_list:
            got = model.compute(feeds)
            want = _plain(m, feeds)
            assert set(got) == set(want)
            for k in want:
                assert got[k].dtype == want[k].dtype, k
                assert got[k].shape == want[k].shape, k
                if want[k].dtype == object:
                    assert got[k].tolist() == want[k].tolist()
                else:
                    np.testing.assert_array_equal(got[k], want[k])


def test_dynamic_shapes_and_several_inputs_outputs(tmp_path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "K"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["K", "M"])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", "M"])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [2])
    m = _model(
        [helper.make_node("MatMul", ["a", "b"], ["c"]),
         helper.make_node("ReduceSum", ["c"], ["s"], keepdims=0, axes=None) if False else
         helper.make_node("ReduceSum", ["c", "ax"], ["s"], keepdims=0),
         helper.make_node("Shape", ["c"], ["n"])],
        [a, b], [c, s, n], [numpy_helper.from_array(np.array([1], np.int64), "ax")],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    feeds = [
        {
            "a": rng.standard_normal((n_, k)).astype(np.float32),
            "b": rng.standard_normal((k, mm)).astype(np.float32),
        }
        for n_, k, mm in [(1, 3, 2), (7, 5, 4), (0, 2, 3)]
    ]
    _same(tmp_path, m, feeds, "dyn")


def test_if_loop_scan(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    trip = helper.make_tensor_value_info("trip", TensorProto.INT64, [])
    # If: x * 2 or x - 1
    then_g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N"])])  # fmt: skip
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N"])])  # fmt: skip
    # Loop: acc = acc + x, trip times
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["acc_in", "x"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["N"])],
    )  # fmt: skip
    # Scan: running sum over x
    scan_body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "xi"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_i"])],
        "scan",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("xi", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("y_i", TensorProto.FLOAT, [])],
    )  # fmt: skip
    m = _model(
        [helper.make_node("If", ["cond"], ["if_out"], then_branch=then_g, else_branch=else_g),
         helper.make_node("Mul", ["x", "zero"], ["zeros"]),
         helper.make_node("Loop", ["trip", "", "zeros"], ["loop_out"], body=body),
         helper.make_node("Scan", ["zero", "x"], ["scan_total", "scan_out"], body=scan_body, num_scan_inputs=1)],
        [x, cond, trip],
        [helper.make_tensor_value_info("if_out", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("loop_out", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("scan_total", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )  # fmt: skip
    feeds = [
        {"x": np.arange(5, dtype=np.float32), "cond": np.array(c), "trip": np.array(t, np.int64)}
        for c, t in [(True, 3), (False, 0), (True, 1)]
    ]
    _same(tmp_path, m, feeds, "ctrl")


def test_string_bool_int8_float16(tmp_path: Path) -> None:
    ins = [
        ("s", TensorProto.STRING),
        ("b", TensorProto.BOOL),
        ("i8", TensorProto.INT8),
        ("h", TensorProto.FLOAT16),
    ]
    m = _model(
        [helper.make_node("Identity", ["s"], ["s_out"]),
         helper.make_node("Not", ["b"], ["b_out"]),
         helper.make_node("Identity", ["i8"], ["i8_out"]),
         helper.make_node("Cast", ["i8"], ["i8_f"], to=TensorProto.FLOAT),
         helper.make_node("Identity", ["h"], ["h_out"]),
         helper.make_node("Cast", ["h"], ["h_f"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info(n, t, ["N"]) for n, t in ins],
        [helper.make_tensor_value_info("s_out", TensorProto.STRING, ["N"]),
         helper.make_tensor_value_info("b_out", TensorProto.BOOL, ["N"]),
         helper.make_tensor_value_info("i8_out", TensorProto.INT8, ["N"]),
         helper.make_tensor_value_info("i8_f", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, ["N"]),
         helper.make_tensor_value_info("h_f", TensorProto.FLOAT, ["N"])],
    )  # fmt: skip
    feeds = {
        "s": np.array(["héllo", "", "wörld"], dtype=object),
        "b": np.array([True, False, True]),
        "i8": np.array([-128, 0, 127], np.int8),
        "h": np.array([1.5, -0.0, 65504], np.float16),
    }
    _same(tmp_path, m, [feeds], "dtypes")


def test_bfloat16(tmp_path: Path) -> None:
    """onnxruntime's Python API has no numpy bridge for bfloat16 (plain
    ``session.run`` refuses it), so the reference here is numpy itself."""
    import ml_dtypes

    m = _model(
        [helper.make_node("Identity", ["bf"], ["bf_out"]),
         helper.make_node("Cast", ["bf"], ["bf_f"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("bf", TensorProto.BFLOAT16, ["N"])],
        [helper.make_tensor_value_info("bf_out", TensorProto.BFLOAT16, ["N"]),
         helper.make_tensor_value_info("bf_f", TensorProto.FLOAT, ["N"])],
    )  # fmt: skip
    bf = np.array([1.0, -2.5, 3e38, 0.0], ml_dtypes.bfloat16)
    s = seal_for_test(tmp_path, m, name="bf16")
    with open_sealed(s) as model:
        assert model.inputs["bf"][0] == "bfloat16"
        got = model.compute({"bf": bf})
    assert got["bf_out"].dtype == bf.dtype
    assert got["bf_out"].tobytes() == bf.tobytes()
    np.testing.assert_array_equal(got["bf_f"], bf.astype(np.float32))


# --- the models shipped inside the onnx wheel ------------------------------------------------

_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _backend_cases(per_dir: int = 6) -> list[str]:
    out: list[str] = []
    for sub in ("simple", "pytorch-converted", "pytorch-operator"):
        dirs = sorted(
            p
            for p in glob.glob(str(_DATA / sub / "*"))
            if os.path.exists(os.path.join(p, "model.onnx"))
        )
        step = max(1, len(dirs) // per_dir)
        out += dirs[::step][:per_dir]
    return out


def _load_tensors(folder: str, prefix: str) -> list[np.ndarray] | None:
    arrays = []
    for f in sorted(
        glob.glob(os.path.join(folder, f"{prefix}_*.pb")),
        key=lambda p: int(p.rsplit("_", 1)[1][:-3]),
    ):
        t = onnx.TensorProto()
        with open(f, "rb") as fh:
            t.ParseFromString(fh.read())
        if not t.name and not t.dims and not t.raw_data and not t.float_data and not t.int64_data:
            return None  # a sequence or optional, not a tensor
        arrays.append(numpy_helper.to_array(t))
    return arrays


@pytest.mark.parametrize(
    "case", _backend_cases(), ids=lambda p: f"{Path(p).parent.name}/{Path(p).name}"
)
def test_onnx_wheel_models(tmp_path: Path, case: str) -> None:
    m = onnx.load(os.path.join(case, "model.onnx"))
    inputs = _load_tensors(os.path.join(case, "test_data_set_0"), "input")
    if inputs is None:
        pytest.skip("non-tensor test data")
    init_names = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in init_names]
    feeds = dict(zip(names, inputs))
    try:
        want = _plain(m, feeds)
    except Exception as exc:  # noqa: BLE001 - a model plain onnxruntime cannot run says nothing about us
        pytest.skip(f"plain onnxruntime cannot run it: {type(exc).__name__}")
    try:
        s = seal_for_test(tmp_path, m, name="backend")
    except SealError as exc:
        pytest.skip(f"refused at seal time: {exc}")
    with open_sealed(s) as model:
        got = model.compute(feeds)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)

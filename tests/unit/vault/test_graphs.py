"""The one purity check (``vault.core.graphs.check_graph``), case by case."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vault.core.errors import UnsafeModelError
from vault.core.graphs import check_graph


def _external(name: str, location: str, length: int = 8, offset: int = 0) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[length // 4])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _model(nodes: list, inits: list | None = None, **kw: object) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits or []),
                          opset_imports=[helper.make_opsetid("", 17)], **kw)  # fmt: skip
    return m


def test_signature_of_a_pure_graph() -> None:
    w = numpy_helper.from_array(np.ones(2, np.float32), "w")
    sig = check_graph(_model([helper.make_node("Add", ["x", "w"], ["y"])], [w]).SerializeToString())
    assert sig.inputs == [{"name": "x", "dtype": "float32", "shape": ["N", 2]}]
    assert sig.outputs == [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]


@pytest.mark.parametrize("location", ["licence.json", "/etc/passwd", "../x", "pipeline.weights2"])
def test_external_data_by_path_is_refused(location: str) -> None:
    m = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_external("w", location)])
    with pytest.raises(UnsafeModelError, match="names external data"):
        check_graph(m.SerializeToString(), {"pipeline.weights": 64})


def test_in_memory_weights_are_accepted_within_bounds_only() -> None:
    ok = _model([helper.make_node("Add", ["x", "w"], ["y"])], [_external("w", "pipeline.weights")])
    check_graph(ok.SerializeToString(), {"pipeline.weights": 8})
    with pytest.raises(UnsafeModelError, match="outside its weight file"):
        check_graph(ok.SerializeToString(), {"pipeline.weights": 4})


def test_external_data_in_a_constant_or_a_branch_is_refused() -> None:
    # even into the package's own weight file: only top-level initializers may be external
    const = helper.make_node("Constant", [], ["w"])
    const.attribute.append(helper.make_attribute("value", _external("c", "pipeline.weights")))
    m = _model([const, helper.make_node("Add", ["x", "w"], ["y"])])
    with pytest.raises(UnsafeModelError, match="'c' names external data"):
        check_graph(m.SerializeToString(), {"pipeline.weights": 64})
    out = [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])]
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["t"])], "b", [], out,
                               [_external("b", "pipeline.weights")])  # fmt: skip
    m2 = _model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)])
    with pytest.raises(UnsafeModelError, match="'b' names external data"):
        check_graph(m2.SerializeToString(), {"pipeline.weights": 64})


def test_training_info_graphs_are_checked_too() -> None:
    m = _model([helper.make_node("Identity", ["x"], ["y"])])
    ti = m.training_info.add()
    ti.initialization.CopyFrom(
        helper.make_graph([], "init", [], [], [_external("t", "/etc/shadow")])
    )
    with pytest.raises(UnsafeModelError, match="/etc/shadow"):
        check_graph(m.SerializeToString())


def test_local_functions_are_fine_custom_domains_are_not() -> None:
    body = [helper.make_node("Neg", ["a"], ["b"])]
    fn = helper.make_function(
        "local.fn", "MyNeg", ["a"], ["b"], body, [helper.make_opsetid("", 17)]
    )
    m = _model([helper.make_node("MyNeg", ["x"], ["y"], domain="local.fn")], functions=[fn])
    check_graph(m.SerializeToString())
    evil = helper.make_function("local.fn", "MyNeg", ["a"], ["b"],
                                [helper.make_node("Evil", ["a"], ["b"], domain="com.evil")],
                                [helper.make_opsetid("", 17)])  # fmt: skip
    m2 = _model([helper.make_node("MyNeg", ["x"], ["y"], domain="local.fn")], functions=[evil])
    with pytest.raises(UnsafeModelError, match="custom domain 'com.evil'"):
        check_graph(m2.SerializeToString())


def _ld(num: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, by hand."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    return varint(num << 3 | 2) + varint(len(payload)) + payload


def test_malformed_and_too_deep() -> None:
    with pytest.raises(UnsafeModelError, match="not a well-formed ONNX model"):
        check_graph(b"\x3a\xff\xff\xff\xff\x0f")
    # If inside If, 70 deep (protobuf's own Python encoder stops before that)
    graph = b""
    for _ in range(70):
        node = _ld(4, b"If") + _ld(5, _ld(6, graph))  # op_type, attribute{g}
        graph = _ld(1, node)
    with pytest.raises(UnsafeModelError, match="nested more than 64 deep"):
        check_graph(_ld(7, graph))

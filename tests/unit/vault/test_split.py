"""Cutting a model: head∘tail equals the whole model, refusals name the path,
the vendor's policy holds, wire encodings are checked, nothing leaks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import classifier_pipeline, mlp, reference_pipeline
from tests.sealed import Sealed, open_sealed
from vault.core.crypto import PublisherKey
from vault.core.errors import SealError
from vault.hybrid.cut import CutGraph, Policy
from vault.hybrid.plan import CutCost, Link, Replanner, format_table, plan
from vault.hybrid.profile import profile_model
from vault.hybrid.publish import _load_pipeline, split, split_graphs

ANY = Policy(protect_from=frozenset({"__none__"}))  # every cut allowed (nothing protected)


def _model(nodes: list, inputs: list, outputs: list, inits: list) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _vi(name: str, shape: list, t: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, t, shape)


def _w(name: str, shape: tuple, seed: int) -> Any:
    return numpy_helper.from_array(
        np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name
    )


def residual() -> onnx.ModelProto:
    """x -> a = relu(x W1); b = relu(a W2); y = (b + a) W3: the skip reads a."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a0"], name="mm1"),
        helper.make_node("Relu", ["a0"], ["a"], name="r1"),
        helper.make_node("MatMul", ["a", "w2"], ["b0"], name="mm2"),
        helper.make_node("Relu", ["b0"], ["b"], name="r2"),
        helper.make_node("Add", ["b", "a"], ["s"], name="skip"),
        helper.make_node("MatMul", ["s", "w3"], ["y"], name="mm3"),
    ]
    return _model(nodes, [_vi("x", ["N", 8])], [_vi("y", ["N", 4])],
                  [_w("w1", (8, 16), 1), _w("w2", (16, 16), 2), _w("w3", (16, 4), 3)])  # fmt: skip


def two_branches() -> onnx.ModelProto:
    """x -> p = x Wp, q = x Wq (two branches) -> y = relu(p) * sigmoid(q)."""
    nodes = [
        helper.make_node("MatMul", ["x", "wp"], ["p"], name="mp"),
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="mq"),
        helper.make_node("Relu", ["p"], ["pr"], name="rp"),
        helper.make_node("Sigmoid", ["q"], ["qs"], name="sq"),
        helper.make_node("Mul", ["pr", "qs"], ["y"], name="mul"),
    ]
    return _model(nodes, [_vi("x", ["N", 8])], [_vi("y", ["N", 6])],
                  [_w("wp", (8, 6), 4), _w("wq", (8, 6), 5)])  # fmt: skip


def control_flow() -> onnx.ModelProto:
    """x -> h = x W; If(sum(h) > 0) then h*2 else h-1 (bodies read h from outside);
    then a Loop adding h three times: top-level cuts only, outer-scope reads count."""
    then_g = helper.make_graph([helper.make_node("Mul", ["h", "two"], ["t_out"])], "then", [],
                               [_vi("t_out", ["N", 6])])  # fmt: skip
    else_g = helper.make_graph([helper.make_node("Sub", ["h", "one"], ["e_out"])], "else", [],
                               [_vi("e_out", ["N", 6])])  # fmt: skip
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "h"], ["acc_out"])],
        "body",
        [_vi("iter", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
         _vi("acc_in", ["N", 6])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("acc_out", ["N", 6])],
    )  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["hs"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["hs", "zero"], ["c"], name="gt"),
        helper.make_node(
            "If", ["c"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"
        ),
        helper.make_node("Loop", ["trips", "true", "branch"], ["looped"], body=body, name="loop"),
        helper.make_node("Relu", ["looped"], ["y"], name="relu"),
    ]
    inits = [_w("w", (8, 6), 6), numpy_helper.from_array(np.array(2, np.float32), "two"),
             numpy_helper.from_array(np.array(1, np.float32), "one"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true")]  # fmt: skip
    return _model(nodes, [_vi("x", ["N", 8])], [_vi("y", ["N", 6])], inits)


def _run(m: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _compose(model: onnx.ModelProto, at: list[str], feeds: dict, policy: Policy = ANY) -> Any:
    head, tail, cut = split_graphs(model, at, policy=policy)
    mid = _run(head, feeds)
    assert set(mid) == set(cut.crossing)
    return _run(tail, {n: mid[n] for n in cut.crossing}), _run(model, feeds), cut


X = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}


@pytest.mark.parametrize(
    "build, at, crossing",
    [
        (mlp, ["h2"], ["h2"]),  # a chain
        (residual, ["b"], ["b", "a"]),  # the skip tensor crosses too
        (two_branches, ["p", "q"], ["p", "q"]),  # several cut tensors
        (control_flow, ["h"], ["h"]),  # If and Loop bodies read h: h crosses once
        (
            control_flow,
            ["branch", "h"],
            ["branch", "h"],
        ),  # cut after the If: the Loop still reads h
    ],
)
def test_head_then_tail_equals_the_whole_model(build: Any, at: list, crossing: list) -> None:
    got, want, cut = _compose(build(), at, X)
    assert cut.crossing == crossing
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


def test_pipeline_pre_and_post_stay_on_their_side() -> None:
    pre, model, post = classifier_pipeline()
    merged, stages = _load_pipeline(model, pre, post, None)
    assert stages == ["pre", "model", "post"]
    head, tail, _ = split_graphs(merged, ["model/h2"], policy=Policy(frozenset({"model/h2"})))
    assert {n.op_type for n in head.graph.node} >= {"Cast", "Sub"}  # pre-process: in the head
    assert {n.op_type for n in tail.graph.node} >= {"Softmax", "TopK"}  # post-process: tail
    assert not {"Softmax", "TopK"} & {n.op_type for n in head.graph.node}
    x = {"image": np.random.default_rng(1).integers(0, 255, (4, 8), dtype=np.uint8)}
    mid = _run(head, x)
    got = _run(tail, mid)
    want = reference_pipeline([pre, model, post], x)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6)


def test_input_reaching_an_output_around_the_cut_is_refused_with_its_path() -> None:
    # y = relu(x W) + z: the second input z bypasses any cut in the x branch
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "z"], ["y"], name="add"),
    ]
    m = _model(nodes, [_vi("x", ["N", 8]), _vi("z", ["N", 6])], [_vi("y", ["N", 6])],
               [_w("w", (8, 6), 7)])  # fmt: skip
    with pytest.raises(SealError, match=r"does not separate the model: z -> y reaches an output"):
        split_graphs(m, ["r"], policy=ANY)


@pytest.mark.parametrize(
    "at, policy, message",
    [
        (["h2"], Policy(), "allows nothing to leave the server"),
        (["h0"], Policy(frozenset({"h2"})), "'h0' is not an allowed split point"),
        (
            ["h3"],
            Policy(protect_from=frozenset({"h2"})),
            "protected node 'secret_dense2' on the caller's side: h2 -> h3",
        ),  # fmt: skip
        (["logits"], ANY, "is a model output"),
        (["nosuch"], ANY, "not a tensor of the top-level graph"),
        (["x"], ANY, "is a graph input"),
        (["h0", "h2"], ANY, "'h0' is not read after the cut"),
    ],
)
def test_invalid_and_protected_cuts_are_refused(at: list, policy: Policy, message: str) -> None:
    with pytest.raises(SealError, match=message):
        split_graphs(mlp(), at, policy=policy)


def test_a_cut_inside_an_if_body_is_refused() -> None:
    with pytest.raises(SealError, match="'t_out' is not a tensor of the top-level graph"):
        split_graphs(control_flow(), ["t_out"], policy=ANY)


def test_candidates_respect_the_protected_region() -> None:
    g = CutGraph(residual())
    names = [c.name for c in g.candidates(Policy(protect_from=frozenset({"b"})))]
    assert names == ["a0", "a", "b0", "b"]  # nothing downstream of b may leave
    by_name = {c.name: c for c in g.candidates(ANY)}
    assert by_name["b0"].crossing == ["b0", "a"]


# --- the planner -------------------------------------------------------------------------------------


def test_planner_minimises_head_transfer_and_tail() -> None:
    costs = [
        CutCost("(inputs)", 0.0, 40.0, 600_000, 4000),  # all on the server: big input
        CutCost("early", 5.0, 38.0, 800_000, 4000),
        CutCost("late", 40.0, 5.0, 20_000, 4000),
    ]
    slow = plan(costs, Link(rtt_ms=50, mbit=10))
    assert slow[0].cut == "late"  # bytes dominate
    fast = plan(costs, Link(rtt_ms=1, mbit=10_000))
    assert fast[0].cut == "(inputs)"  # a fast link: ship the input, run all on the server
    assert fast[0].total_ms == pytest.approx(40 + 1 + 604_000 * 8 / 1e7)
    table = format_table(slow, Link(50, 10))
    assert table.splitlines()[2].startswith("* late")


def test_replanner_switches_only_on_a_clear_and_lasting_change() -> None:
    costs = [CutCost("c0", 5.0, 20.0, 500_000, 0), CutCost("c1", 20.0, 5.0, 10_000, 0)]
    r = Replanner(costs, "c0", hysteresis=0.2, patience=3)
    fast, slow = Link(1, 1000), Link(20, 10)
    assert [r.choose(fast) for _ in range(5)] == ["c0"] * 5
    assert [r.choose(slow), r.choose(fast), r.choose(slow), r.choose(slow)] == ["c0"] * 4
    assert r.choose(slow) == "c1" and r.switches == 1  # three in a row
    # close to even (within the hysteresis): it stays
    even = Link(1, 8 * 490_000 / 1e3 / 15)  # c0's transfer ~ equals c1's extra compute
    assert [r.choose(even) for _ in range(5)] == ["c1"] * 5


def test_profile_covers_every_node_and_adds_up_to_a_run() -> None:
    m = residual()
    prof = profile_model(m, repeats=3, threads=1)
    assert set(prof["nodes"]) == {n.name for n in m.graph.node}
    assert sum(prof["nodes"].values()) == pytest.approx(prof["run_ms"], rel=0.01, abs=1e-3)
    assert all(v >= 0 for v in prof["nodes"].values())


# --- split: encodings, leak ------------------------------------------------------------------------


class _Keys:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def __call__(self, res: Any) -> None:
        self.keys[res.model_id] = bytes(res.key)


def _split(tmp: Path, model: Any, **kw: Any) -> tuple[dict, _Keys, PublisherKey]:
    pk = PublisherKey.generate()
    pk.save(tmp / "publisher.key", tmp / "publisher.pub")
    keys = _Keys()
    res = split(model, model_id="m", signing_key=pk, output_dir=tmp / "m.split", register=keys,
                profile_repeats=2, **kw)  # fmt: skip
    return res.description, keys, pk


@pytest.mark.parametrize(
    "encoding, wire_dtype, itemsize", [("float16", "float16", 2), ("int8", "int8", 1)]
)
def test_wire_encoding_is_checked_and_shrinks_the_cut(
    tmp_path: Path, encoding: str, wire_dtype: str, itemsize: int
) -> None:
    desc, keys, _ = _split(tmp_path, mlp(), at=[["h2"]], split_points=["h2"], encoding=encoding,
                           max_error=0.5, min_agreement=0.9)  # fmt: skip
    cut = desc["cuts"][0]
    assert cut["crossing"][0]["encoding"] == encoding
    assert cut["cost"]["bytes_up"] == 64 * itemsize  # hidden 64 at batch 1
    acc = cut["accuracy"]
    assert acc["checked"] and 0 < acc["max_abs_error"] <= 0.5 and acc["top1_agreement"] >= 0.9
    head = onnx.load(tmp_path / "m.split" / cut["head"])
    assert helper.tensor_dtype_to_np_dtype(
        head.graph.output[0].type.tensor_type.elem_type
    ) == np.dtype(wire_dtype)


def test_wire_encoding_beyond_the_tolerance_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SealError, match="int8 on the wire is off by up to .* refused, use float32"):
        _split(tmp_path, mlp(), at=[["h2"]], split_points=["h2"], encoding="int8", max_error=1e-6)


def test_sealed_artifacts_compose_to_the_whole_pipeline(tmp_path: Path) -> None:
    """The written head (plain ONNX) then the sealed tail in a real worker equals the
    whole pipeline run in-process; the float32 check reports an exact match."""
    pre, model, post = classifier_pipeline()
    desc, keys, _ = _split(tmp_path, model, pre=pre, post=post, at=[["h2"]], split_points=["h2"])
    cut = desc["cuts"][0]
    assert cut["accuracy"]["max_abs_error"] == 0.0
    assert cut["crossing"][0]["name"] == "model/h2"
    x = {"image": np.random.default_rng(3).integers(0, 255, (5, 8), dtype=np.uint8)}
    mid = _run(onnx.load(tmp_path / "m.split" / cut["head"]), x)
    tail = Sealed(str(tmp_path / "m.split" / cut["tail"]), keys.keys["m.tail"],
                  str(tmp_path / "publisher.pub"), {})  # fmt: skip
    with open_sealed(tail) as t:
        assert set(t.inputs) == {"model/h2"}
        got = t.compute(mid)
    for k, v in reference_pipeline([pre, model, post], x).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6)


def _sentinels(model: onnx.ModelProto, names: list[str]) -> list[bytes]:
    out = []
    for t in model.graph.initializer:
        if t.name in names:
            s = bytearray(os.urandom(24))
            s[3::4] = b"\x3e" * 6  # each float32 stays finite and small
            s = bytes(s)
            arr = numpy_helper.to_array(t).copy()
            arr.reshape(-1).view(np.uint8)[: len(s)] = np.frombuffer(s, np.uint8)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            out.append(s)
    return out


def test_the_tail_package_reveals_no_weights_and_external_data_stays_sealed(tmp_path: Path) -> None:
    """Head and tail weights carry random sentinels; the model comes with its weights
    in an external-data file. The tail's sentinel is nowhere in the split directory in
    the clear; the tail package holds neither sentinel."""
    m = mlp()
    head_s, tail_s = _sentinels(m, ["secret_dense1_weight", "secret_dense2_weight"])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(m, src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)  # fmt: skip
    assert tail_s in (src / "m.weights").read_bytes()
    desc, _, _ = _split(tmp_path, str(src / "m.onnx"), at=[["h2"]], split_points=["h2"])
    out = tmp_path / "m.split"
    tail = (out / desc["cuts"][0]["tail"]).read_bytes()
    assert head_s not in tail and tail_s not in tail
    for f in out.iterdir():
        assert tail_s not in f.read_bytes(), f.name
    assert head_s in (out / desc["cuts"][0]["head"]).read_bytes()  # control: the head is plain
    assert "secret_dense2" not in json.dumps(desc)  # the description names no tail node


def test_planner_may_choose_all_server_and_the_tail_is_then_the_whole_model(tmp_path: Path) -> None:
    """A caller device 1000x slower than the server: the planner ships the input."""
    m = mlp()
    server = {"format": "vault-profile/1", "nodes": {n.name: 0.01 for n in m.graph.node}}
    client = {"format": "vault-profile/1", "nodes": {n.name: 10.0 for n in m.graph.node}}
    pk = PublisherKey.generate()
    pk.save(tmp_path / "publisher.key", tmp_path / "publisher.pub")
    keys = _Keys()
    res = split(m, model_id="m", signing_key=pk, output_dir=tmp_path / "m.split", register=keys,
                link=Link(rtt_ms=5, mbit=100), protect_from=["h3"], client_costs=client,
                server_costs=server)  # fmt: skip
    assert res.table is not None and res.table.splitlines()[2].startswith("* (inputs)")
    cut = res.description["cuts"][0]
    assert cut["all_server"] and cut["head"] is None
    assert [c["name"] for c in cut["crossing"]] == ["x"]
    tail = Sealed(str(tmp_path / "m.split" / cut["tail"]), keys.keys["m.tail"],
                  str(tmp_path / "publisher.pub"), {})  # fmt: skip
    with open_sealed(tail) as t:
        np.testing.assert_allclose(t.compute(X)["logits"], _run(m, X)["logits"], rtol=1e-6)

"""Sealing: wiring, seal-time refusals, external data, composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import classifier_pipeline, mlp, postprocess, preprocess, reference_pipeline
from tests.unit.vault.test_package import run_plaintext
from vault.core import crypto as _crypto
from vault.core.errors import SealError, UnsafeModelError
from vault.core.package import Package
from vault.sealing import seal


@pytest.fixture(scope="module")
def publisher() -> _crypto.PublisherKey:
    return _crypto.PublisherKey.generate()


def test_model_only_package_runs(tmp_path: Path, publisher: _crypto.PublisherKey) -> None:
    model = mlp()
    r = seal(model, model_id="m", signing_key=publisher, output=tmp_path / "m.vault")
    pkg = Package.load(r.path)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    got = run_plaintext(pkg, r.key, feeds)
    np.testing.assert_allclose(
        got["logits"], reference_pipeline([model], feeds)["logits"], rtol=1e-5
    )


def test_explicit_io_map_wires_different_names(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    pre, model, post = preprocess(), mlp(input_name="features"), postprocess()
    with pytest.raises(SealError, match="share no name"):
        seal(model, pre=pre, model_id="m", signing_key=publisher, output=tmp_path / "a.vault")
    r = seal(model, pre=pre, post=post, model_id="m", signing_key=publisher,
             output=tmp_path / "b.vault", io_map={"pre": {"x": "features"}})  # fmt: skip
    feeds = {"image": np.arange(16, dtype=np.uint8).reshape(2, 8)}
    got = run_plaintext(Package.load(r.path), r.key, feeds)
    # reference: rename by hand
    ref_pre = reference_pipeline([pre], feeds)["x"]
    want = reference_pipeline([model, post], {"features": ref_pre})
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5)


def test_type_mismatch_names_both_ends(tmp_path: Path, publisher: _crypto.PublisherKey) -> None:
    pre = preprocess()
    model = mlp()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    # keep the model valid: cast the double input back to float first
    model.graph.node[0].input[0] = "x_f"
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x_f"], to=TensorProto.FLOAT))
    with pytest.raises(SealError) as info:
        seal(model, pre=pre, model_id="m", signing_key=publisher, output=tmp_path / "m.vault")
    msg = str(info.value)
    assert "pre output 'x' (float32" in msg and "model input 'x' (float64" in msg


def test_shape_disagreement_warns_naming_both_ends(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    """Declared shapes are advisory (onnxruntime does not enforce an output's
    declared shape): a pre stage that declares [N, 4] but computes the [N, 8]
    the model takes seals, with a warning, and runs."""
    pre = preprocess(n_features=8)
    pre.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4  # the exporter's slip
    r = seal(mlp(n_features=8), pre=pre, model_id="m", signing_key=publisher,
             output=tmp_path / "m.vault")  # fmt: skip
    assert len(r.warnings) == 1
    assert "pre output 'x' declares shape ['N', 4]" in r.warnings[0]
    assert "model input 'x' declares ['N', 8]" in r.warnings[0]
    feeds = {"image": np.arange(16, dtype=np.uint8).reshape(2, 8)}
    got = run_plaintext(Package.load(r.path), r.key, feeds)
    want = reference_pipeline([preprocess(n_features=8), mlp(n_features=8)], feeds)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5)


def test_a_pipeline_onnxruntime_cannot_load_is_refused_naming_the_shapes(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    """A pre stage computing [N, 4] in front of a model whose weights take
    [N, 8] can never run: it sealed with a warning and every load failed
    with "the pipeline could not be loaded (Fail)". Refused now, with
    onnxruntime's reason and both declared shapes, and nothing written."""
    out = tmp_path / "m.vault"
    with pytest.raises(SealError) as info:
        seal(mlp(n_features=8), pre=preprocess(n_features=4), model_id="m",
             signing_key=publisher, output=out)  # fmt: skip
    msg = str(info.value)
    assert "the pipeline does not load in onnxruntime" in msg, msg
    assert "ShapeInferenceError" in msg and "Incompatible dimensions" in msg, msg
    assert "pre output 'x' declares shape ['N', 4], model input 'x' ['N', 8]" in msg
    assert not out.exists()


def test_an_operator_without_a_cpu_kernel_seals_with_a_warning(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    """The load at seal time runs on the CPU: a bfloat16 Add (onnxruntime's
    CPU has no kernel for it, its CUDA provider has) is not refused, since a
    GPU worker may run it; the seal says a CPU worker cannot. The control: a
    graph onnxruntime finds invalid (Det of int32) is refused."""

    def one(op: str, dtype: int, inputs: list[str]) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", dtype, [2, 2])
        y = helper.make_tensor_value_info("y", dtype, [2, 2] if op == "Add" else [])
        return helper.make_model(helper.make_graph([helper.make_node(op, inputs, ["y"])], "g",
                                                   [x], [y]),
                                 opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip

    res = seal(one("Add", TensorProto.BFLOAT16, ["x", "x"]), model_id="bf", signing_key=publisher,
               output=tmp_path / "bf.vault")  # fmt: skip
    assert (tmp_path / "bf.vault").exists()
    assert any("does not load on this CPU" in w and "Add" in w for w in res.warnings), res.warnings
    # --batchable is a checked declaration: checked by running it here, which cannot be
    with pytest.raises(SealError, match="--batchable is checked by running the pipeline"):
        seal(one("Add", TensorProto.BFLOAT16, ["x", "x"]), model_id="bf", signing_key=publisher,
             output=tmp_path / "bf2.vault", batchable=True)  # fmt: skip
    with pytest.raises(SealError, match="does not load in onnxruntime"):
        seal(one("Det", TensorProto.INT32, ["x"]), model_id="det", signing_key=publisher,
             output=tmp_path / "det.vault")  # fmt: skip
    assert not (tmp_path / "det.vault").exists()


def test_an_overridable_weight_is_no_public_input_and_sealing_says_so(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    """A graph input with an initializer is a weight plain onnxruntime lets a
    caller replace; fed weights could turn later layers into a window on
    earlier ones, so the package keeps it (its initializer is used) and the
    seal says so, naming it, instead of dropping it silently."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    init = numpy_helper.from_array(np.array([10, 20], np.float32), "b")
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])],
                                                "ov", [x, b], [y], [init]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    r = seal(model, model_id="ov", signing_key=publisher, output=tmp_path / "ov.vault")
    assert [i["name"] for i in Package.load(r.path).inputs] == ["x"]
    assert len(r.warnings) == 1 and "'b' of the model stage have initializers" in r.warnings[0]
    assert not seal(
        mlp(), model_id="m", signing_key=publisher, output=tmp_path / "m.vault"
    ).warnings


def test_custom_domain_is_refused(tmp_path: Path, publisher: _crypto.PublisherKey) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("EvilOp", ["x"], ["y"], domain="com.evil.customops")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.evil.customops", 1)],
    )
    with pytest.raises(SealError, match="custom domain 'com.evil.customops'"):
        seal(model, model_id="m", signing_key=publisher, output=tmp_path / "m.vault")
    assert not (tmp_path / "m.vault").exists()


def test_sequences_are_described_and_sparse_inputs_refused(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    seq_in = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pos = numpy_helper.from_array(np.array(0, np.int64), "pos")
    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("SequenceAt", ["s", "pos"], ["y"])], "g", [seq_in], [y], [pos]
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    r = seal(m, model_id="m", signing_key=publisher, output=tmp_path / "a.vault")
    assert r.manifest["inputs"] == [{"name": "s", "dtype": "sequence<float32>", "shape": None}]

    sparse = helper.make_value_info(
        "sp", helper.make_sparse_tensor_type_proto(TensorProto.FLOAT, [4])
    )
    m2 = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["sp"], ["y"])], "g", [sparse], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(UnsafeModelError, match="'sp' is a sparse tensor value"):
        seal(m2, model_id="m", signing_key=publisher, output=tmp_path / "b.vault")


def test_invalid_graph_fails_checker(tmp_path: Path, publisher: _crypto.PublisherKey) -> None:
    model = mlp()
    model.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(SealError, match="model: "):
        seal(model, model_id="m", signing_key=publisher, output=tmp_path / "m.vault")


def test_bad_model_id_and_missing_file(tmp_path: Path, publisher: _crypto.PublisherKey) -> None:
    with pytest.raises(SealError, match="model id"):
        seal(mlp(), model_id="../etc", signing_key=publisher, output=tmp_path / "m.vault")
    with pytest.raises(SealError, match="no such file"):
        seal(
            tmp_path / "absent.onnx",
            model_id="m",
            signing_key=publisher,
            output=tmp_path / "m.vault",
        )


def test_external_data_weights_are_sealed_inside(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = mlp(n_features=32, hidden=256)
    want_model = onnx.ModelProto()
    want_model.CopyFrom(model)
    onnx.save(model, src / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)  # fmt: skip
    assert (src / "weights.bin").stat().st_size > 32 * 256 * 4
    r = seal(
        src / "model.onnx", model_id="ext", signing_key=publisher, output=tmp_path / "ext.vault"
    )
    blob = Path(r.path).read_bytes()
    raw = numpy_helper.to_array(want_model.graph.initializer[0]).tobytes()
    assert raw[:32] not in blob and raw[1000:1032] not in blob
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)}
    got = run_plaintext(Package.load(r.path), r.key, feeds)
    np.testing.assert_allclose(
        got["logits"], reference_pipeline([want_model], feeds)["logits"], rtol=1e-5
    )


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_external_data_outside_folder_is_refused(
    tmp_path: Path, publisher: _crypto.PublisherKey, location: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = mlp()
    onnx.save(model, src / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="w.bin", size_threshold=0)  # fmt: skip
    m = onnx.load(src / "model.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, src / "evil.onnx")
    with pytest.raises(SealError, match="external data"):
        seal(src / "evil.onnx", model_id="m", signing_key=publisher, output=tmp_path / "m.vault")


def test_conflicting_opsets_fall_back_to_chained_stages(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    pre, model, post = classifier_pipeline()
    pre.opset_import[0].version = 13  # Cast/Mul/Sub exist in 13: valid, but not mergeable as is
    r = seal(
        model, pre=pre, post=post, model_id="m", signing_key=publisher, output=tmp_path / "m.vault"
    )
    pkg = Package.load(r.path)
    assert pkg.manifest["composed"] is False
    feeds = {"image": np.arange(24, dtype=np.uint8).reshape(3, 8)}
    got = run_plaintext(pkg, r.key, feeds)
    want = reference_pipeline([pre, model, post], feeds)
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5)
    np.testing.assert_array_equal(got["top_indices"], want["top_indices"])


def test_split_points_are_checked(tmp_path: Path, publisher: _crypto.PublisherKey) -> None:
    r = seal(
        mlp(), model_id="m", signing_key=publisher, output=tmp_path / "m.vault", split_points=["h2"]
    )
    assert Package.load(r.path).manifest["split_points"] == ["h2"]
    with pytest.raises(SealError, match="split point 'nope'"):
        seal(
            mlp(),
            model_id="m",
            signing_key=publisher,
            output=tmp_path / "n.vault",
            split_points=["nope"],
        )


def test_models_too_big_to_serialise_are_checked_without_their_weights(
    tmp_path: Path, publisher: _crypto.PublisherKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 2 GiB the checker gets the graph with weights as typed inputs (the
    opt-in VAULT_TEST_LARGE test runs a real 2.5 GiB model); here the same path
    is forced on a small model, and a broken one is still caught."""
    from vault import sealing as _seal

    monkeypatch.setattr(_seal, "_too_big", lambda model: True)
    pre, model, post = classifier_pipeline()
    r = seal(
        model, pre=pre, post=post, model_id="m", signing_key=publisher, output=tmp_path / "m.vault"
    )
    feeds = {"image": np.arange(16, dtype=np.uint8).reshape(2, 8)}
    got = run_plaintext(Package.load(r.path), r.key, feeds)
    np.testing.assert_allclose(
        got["probs"], reference_pipeline([pre, model, post], feeds)["probs"], rtol=1e-5
    )
    broken = mlp()
    broken.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(SealError, match="model: "):
        seal(broken, model_id="m", signing_key=publisher, output=tmp_path / "b.vault")


def test_stages_whose_names_do_not_meet_are_told_the_map_syntax_that_works(tmp_path: Path) -> None:
    """The refusal said `--map OUT=IN`; the CLI takes `--map pre:OUT=IN` (or
    `post:`). It names the stage now, and that mapping seals."""

    def ident(i: str, o: str) -> onnx.ModelProto:
        g = helper.make_graph([helper.make_node("Identity", [i], [o])], "g",
                              [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1])])  # fmt: skip
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m

    key = _crypto.PublisherKey.generate()
    with pytest.raises(SealError, match=r"--map pre:OUT=IN"):
        seal(ident("x", "y"), pre=ident("raw", "pixels"), model_id="m", signing_key=key,
             output=tmp_path / "a.vault")  # fmt: skip
    with pytest.raises(SealError, match=r"--map post:OUT=IN"):
        seal(ident("x", "y"), post=ident("scores", "label"), model_id="m", signing_key=key,
             output=tmp_path / "b.vault")  # fmt: skip
    seal(ident("x", "y"), pre=ident("raw", "pixels"), io_map={"pre": {"pixels": "x"}},
         model_id="m", signing_key=key, output=tmp_path / "c.vault")  # fmt: skip


def test_a_sequence_or_map_output_seals_with_a_warning_that_the_oip_doors_cannot_carry_it(
    tmp_path: Path, publisher: _crypto.PublisherKey
) -> None:
    """skl2onnx's classifiers give their probabilities as a ZipMap (a
    sequence of maps) by default: sealed and served, it vanished from the
    Open Inference Protocol's metadata with no word anywhere. The seal now
    says so and how to get a tensor instead; a tensor-only model seals
    without it (the control)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.random((20, 4), dtype=np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(int))
    zipmap = to_onnx(clf, x[:1])
    r = seal(zipmap, model_id="clf", signing_key=publisher, output=tmp_path / "z.vault")
    (w,) = r.warnings
    assert "output 'output_probability' (sequence<map<int64,float32>>) is not a tensor" in w
    assert "cannot carry it" in w and "{'zipmap': False}" in w
    plain = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}})
    assert not seal(plain, model_id="clf", signing_key=publisher,
                    output=tmp_path / "p.vault").warnings  # fmt: skip

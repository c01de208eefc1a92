"""worker.runtime: sessions from memory, the public signature, refused options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.models import classifier_pipeline, mlp, preprocess, reference_pipeline
from vault.core.errors import ComputeError, ConfigError, InputError
from worker.runtime import Pipeline, choose_providers, session_options


@pytest.fixture(scope="module")
def stages() -> tuple:
    return classifier_pipeline()


def test_runs_from_bytes_and_matches_plain_onnxruntime() -> None:
    m = mlp()
    pipe = Pipeline([m.SerializeToString()])
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    got = pipe.run({"x": x})
    want = reference_pipeline([m], {"x": x})
    np.testing.assert_array_equal(got["logits"], want["logits"])
    assert pipe.provider == "CPUExecutionProvider"


def test_model_bytes_copy_is_overwritten() -> None:
    from worker.runtime import _wipe_bytes

    b = bytes(bytearray(b"secret-weights" * 10))
    _wipe_bytes(b)
    assert b == bytes(len(b))


def test_several_graphs_are_chained_by_name(stages: tuple) -> None:
    pre, model, post = stages
    pipe = Pipeline([g.SerializeToString() for g in stages])
    x = np.random.default_rng(2).integers(0, 255, (3, 8), dtype=np.uint8)
    got = pipe.run({"image": x})
    want = reference_pipeline(list(stages), {"image": x})
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_internal_name_gets_the_same_error_as_an_unknown_one(stages: tuple) -> None:
    pipe = Pipeline([g.SerializeToString() for g in stages])
    x = np.zeros((1, 8), np.uint8)
    with pytest.raises(InputError) as internal:
        pipe.run({"image": x}, ["logits"])  # exists inside the pipeline
    with pytest.raises(InputError) as unknown:
        pipe.run({"image": x}, ["nosuch"])
    assert str(internal.value).replace("'logits'", "X") == str(unknown.value).replace(
        "'nosuch'", "X"
    )
    with pytest.raises(InputError) as feed_internal:
        pipe.run({"image": x, "x": np.zeros((1, 8), np.float32)})
    with pytest.raises(InputError) as feed_unknown:
        pipe.run({"image": x, "zz": np.zeros((1, 8), np.float32)})
    assert str(feed_internal.value).replace("'x'", "X") == str(feed_unknown.value).replace(
        "'zz'", "X"
    )


@pytest.mark.parametrize(
    "feeds, match",
    [
        ({}, "missing input"),
        ({"image": np.zeros((1, 8), np.float32)}, "must be uint8"),
        ({"image": np.zeros((8,), np.uint8)}, "rank 2"),
        ({"image": np.zeros((1, 7), np.uint8)}, "dimension 1 must be 8"),
    ],
)
def test_bad_inputs_are_input_errors(stages: tuple, feeds: dict, match: str) -> None:
    pipe = Pipeline([g.SerializeToString() for g in stages])
    with pytest.raises(InputError, match=match):
        pipe.run(feeds)


def test_onnxruntime_errors_are_sanitised() -> None:
    # Reshape to an impossible shape fails inside onnxruntime, whose message names the node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = helper.make_tensor("secret_shape_const", TensorProto.INT64, [2], [3, 3])
    node = helper.make_node("Reshape", ["x", "secret_shape_const"], ["y"], name="secret_node_name")
    g = helper.make_graph([node], "g", [x], [y], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    pipe = Pipeline([m.SerializeToString()])
    with pytest.raises(ComputeError) as exc:
        pipe.run({"x": np.zeros(5, np.float32)})
    assert "secret" not in str(exc.value)
    assert exc.value.__cause__ is None and exc.value.__context__ is None


def test_a_pipeline_that_cannot_load_says_why_naming_nothing_inside() -> None:
    """A package sealed before seal checked that its pipeline loads (or built
    by another tool): a pre stage computing [N, 4] in front of a model whose
    weights take [N, 8]. The load failed with "could not be loaded (Fail)",
    no cause; now the kind of failure is said, in words that name no node,
    op or tensor of the model (onnxruntime's own text names them)."""
    from vault.sealing import _compose, _wire

    pre, model = preprocess(n_features=4), mlp(n_features=8)
    for i, n in enumerate(model.graph.node):
        n.name = f"secret_node_{i}"
    merged = _compose([("pre", pre), ("model", model)], [_wire(pre, model, "pre", "model", None)])
    with pytest.raises(ComputeError) as exc:
        Pipeline([merged.SerializeToString()])
    msg = str(exc.value)
    assert "could not be loaded" in msg and "shapes in the graph disagree" in msg, msg
    assert not any(w in msg for w in ("secret", "MatMul", "model/", "'x'")), msg
    assert exc.value.__cause__ is None and exc.value.__context__ is None


def test_onnxruntime_logs_nothing_about_nodes(capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    test_onnxruntime_errors_are_sanitised()
    out, err = capfd.readouterr()
    assert "secret" not in out + err


@pytest.mark.parametrize(
    "opt",
    ["optimized_model_filepath", "enable_profiling", "profile_file_prefix", "log_severity_level"],
)
def test_leaky_session_options_are_refused(opt: str) -> None:
    with pytest.raises(ConfigError, match="refused"):
        session_options({opt: "x"})


def test_safe_session_defaults() -> None:
    so = session_options({"intra_op_num_threads": 1})
    assert so.log_severity_level >= 3  # in fact 4: error lines name nodes too
    assert so.enable_profiling is False
    assert so.optimized_model_filepath == ""


def test_cuda_without_onnxruntime_gpu_is_a_config_error() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is present here")
    with pytest.raises(ConfigError, match="CUDA"):
        choose_providers(device="cuda")
    with pytest.raises(ConfigError, match="CUDA"):
        choose_providers(["CUDAExecutionProvider"])
    with pytest.raises(ConfigError):
        choose_providers(["TensorrtExecutionProvider"])
    assert choose_providers() == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_cuda_provider_is_used_and_reported() -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    m = mlp()
    pipe = Pipeline([m.SerializeToString()], device="cuda")
    assert pipe.provider == "CUDAExecutionProvider"
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose(
        pipe.run({"x": x})["logits"], reference_pipeline([m], {"x": x})["logits"], rtol=1e-4
    )


def test_closed_pipeline_refuses() -> None:
    pipe = Pipeline([mlp().SerializeToString()])
    pipe.close()
    with pytest.raises(ComputeError):
        pipe.run({"x": np.ones((1, 8), np.float32)})


def test_declared_sizes_are_checked_from_the_header_alone() -> None:
    s = helper.make_tensor_value_info("s", TensorProto.STRING, [3])
    t = helper.make_tensor_value_info("t", TensorProto.STRING, [3])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "g", [s], [t]),
                          opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    pipe = Pipeline([m.SerializeToString()])
    with pytest.raises(InputError, match="dimension 0 must be 3"):
        pipe.check_declared_shapes([{"name": "s", "dtype": "string", "shape": [30_000_000]}])
    with pytest.raises(InputError, match="rank 1"):
        pipe.check_declared_shapes([{"name": "s", "dtype": "string", "shape": [3, 1]}])
    pipe.check_declared_shapes([{"name": "s", "dtype": "string", "shape": [3]}])


def test_a_graph_naming_a_file_is_refused_before_onnxruntime_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vault.core.errors import UnsafeModelError

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", "8")):
        e = w.external_data.add()
        e.key, e.value = k, v
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    m = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                          opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    (tmp_path / "weights.bin").write_bytes(np.ones(2, np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeModelError, match="weights.bin"):
        Pipeline([m.SerializeToString()])

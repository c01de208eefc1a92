"""ONNX models built on the spot with ``onnx.helper`` for the tests.

Example::

    from tests.models import classifier_pipeline
    pre, model, post = classifier_pipeline()
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def preprocess(n_features: int = 8) -> onnx.ModelProto:
    """uint8 ``image`` [N, F] -> float ``x`` scaled to [0, 1] and centred."""
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", n_features])
    y = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])
    scale = numpy_helper.from_array(np.array(1 / 255, np.float32), "pre_scale")
    mean = numpy_helper.from_array(np.array(0.5, np.float32), "pre_mean")
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Mul", ["xf", "pre_scale"], ["xs"], name="pre_scale_node"),
        helper.make_node("Sub", ["xs", "pre_mean"], ["x"], name="pre_centre"),
    ]
    return _model(helper.make_graph(nodes, "pre", [x], [y], [scale, mean]))


def mlp(
    n_features: int = 8,
    hidden: int = 64,
    n_classes: int = 5,
    *,
    seed: int = 0,
    sentinel: bytes | None = None,
    input_name: str = "x",
) -> onnx.ModelProto:
    """``x`` [N, F] -> ``logits`` [N, C]: MatMul, Add, Relu, MatMul, Add.

    With ``sentinel``, those bytes are planted at the start of the first
    weight matrix (to prove they never reach the disk in the clear).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_features, hidden)).astype(np.float32)
    if sentinel is not None:
        flat = w1.reshape(-1).view(np.uint8)
        flat[: len(sentinel)] = np.frombuffer(sentinel, np.uint8)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, n_classes)).astype(np.float32)
    b2 = rng.standard_normal(n_classes).astype(np.float32)
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", n_features])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])
    inits = [
        numpy_helper.from_array(w1, "secret_dense1_weight"),
        numpy_helper.from_array(b1, "secret_dense1_bias"),
        numpy_helper.from_array(w2, "secret_dense2_weight"),
        numpy_helper.from_array(b2, "secret_dense2_bias"),
    ]
    nodes = [
        helper.make_node(
            "MatMul", [input_name, "secret_dense1_weight"], ["h0"], name="secret_dense1"
        ),
        helper.make_node("Add", ["h0", "secret_dense1_bias"], ["h1"], name="secret_bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="secret_relu"),
        helper.make_node("MatMul", ["h2", "secret_dense2_weight"], ["h3"], name="secret_dense2"),
        helper.make_node("Add", ["h3", "secret_dense2_bias"], ["logits"], name="secret_bias2"),
    ]
    return _model(helper.make_graph(nodes, "model", [x], [y], inits))


def postprocess(n_classes: int = 5, k: int = 3) -> onnx.ModelProto:
    """``logits`` -> ``probs`` (softmax) and ``top_values``/``top_indices`` (top-k)."""
    x = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_classes])
    tv = helper.make_tensor_value_info("top_values", TensorProto.FLOAT, ["N", k])
    ti = helper.make_tensor_value_info("top_indices", TensorProto.INT64, ["N", k])
    kk = numpy_helper.from_array(np.array([k], np.int64), "post_k")
    nodes = [
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="post_softmax"),
        helper.make_node("TopK", ["probs", "post_k"], ["top_values", "top_indices"], axis=-1),
    ]
    return _model(helper.make_graph(nodes, "post", [x], [probs, tv, ti], [kk]))


def classifier_pipeline(
    n_features: int = 8, n_classes: int = 5, **kw: object
) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto]:
    return (
        preprocess(n_features),
        mlp(n_features, n_classes=n_classes, **kw),  # type: ignore[arg-type]
        postprocess(n_classes),
    )


def reference_pipeline(
    stages: list[onnx.ModelProto], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the stages one after another with plain in-process onnxruntime."""
    import onnxruntime as ort

    values = dict(feeds)
    for m in stages:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        outs = s.run(None, {n: values[n] for n in names})
        values.update({o.name: v for o, v in zip(s.get_outputs(), outs)})
    last = stages[-1]
    return {o.name: values[o.name] for o in last.graph.output}


def slow_matmul(
    width: int = 512, depth: int = 16, *, fixed_batch: int | None = None
) -> onnx.ModelProto:
    """``x`` [N, W] -> ``y`` [N, W]: ``depth`` MatMuls by one shared weight.

    Its cost grows with N (about 1 ms per row-block of 1 at W=512 on one thread,
    ~0.5 s at N=1024): a call as slow as a test needs, from a small package.
    With ``fixed_batch`` the first dim is that fixed size (not batchable)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    d0: int | str = fixed_batch if fixed_batch is not None else "N"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [d0, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [d0, width])
    nodes = []
    prev = "x"
    for i in range(depth):
        out = "y" if i == depth - 1 else f"secret_h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "secret_w"], [out], name=f"secret_mm{i}"))
        prev = out
    w_init = numpy_helper.from_array(w, "secret_w")
    return _model(helper.make_graph(nodes, "slow", [x], [y], [w_init]))


def blocks_model(
    n_features: int = 8, hidden: int = 16, n_classes: int = 5, *, seed: int = 0
) -> onnx.ModelProto:
    """``x`` [N, F] -> ``logits`` [N, C] through three blocks (MatMul, Relu)
    whose outputs are ``block1_out``..``block3_out``: the tensor names the
    hybrid's documentation cuts at (``--protect-from block3_out``)."""
    rng = np.random.default_rng(seed)
    dims = [n_features, hidden, hidden, hidden]
    inits, nodes = [], []
    prev = "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"block{i + 1}_w"))
        nodes.append(helper.make_node("MatMul", [prev, f"block{i + 1}_w"], [f"block{i + 1}_mm"],
                                      name=f"block{i + 1}_matmul"))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"block{i + 1}_mm"], [f"block{i + 1}_out"],
                                      name=f"block{i + 1}_relu"))  # fmt: skip
        prev = f"block{i + 1}_out"
    w = (rng.standard_normal((hidden, n_classes)) / np.sqrt(hidden)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "head_w"))
    nodes.append(helper.make_node("MatMul", ["block3_out", "head_w"], ["logits"], name="head"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])
    return _model(helper.make_graph(nodes, "blocks", [x], [y], inits))


# Open Inference Protocol datatype -> ONNX element type, for all_types()
OIP_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def all_types() -> onnx.ModelProto:
    """One input ``in_T`` [N, 2] and one output ``out_T`` [N, 2] per datatype T
    of the Open Inference Protocol (``OIP_TYPES``): each output is its input
    transformed in a way the type allows (numbers doubled, booleans negated,
    strings passed through), plus ``is_hello`` (bool [N, 2]: which strings
    equal ``"hello"``)."""
    inputs, outputs, nodes, inits = [], [], [], []
    for name, et in OIP_TYPES.items():
        t = name.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{t}", et, ["N", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{t}", et, ["N", 2]))
        if et == TensorProto.BOOL:
            nodes.append(helper.make_node("Not", [f"in_{t}"], [f"out_{t}"]))
        elif et == TensorProto.STRING:
            nodes.append(helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"]))
            hello = numpy_helper.from_array(np.array("hello", dtype=object), "hello")
            inits.append(hello)
            nodes.append(helper.make_node("Equal", [f"in_{t}", "hello"], ["is_hello"]))
        else:
            nodes.append(helper.make_node("Add", [f"in_{t}", f"in_{t}"], [f"out_{t}"]))
    outputs.append(helper.make_tensor_value_info("is_hello", TensorProto.BOOL, ["N", 2]))
    return _model(helper.make_graph(nodes, "all_types", inputs, outputs, inits), opset=19)


def batch_centred(n_features: int = 4) -> onnx.ModelProto:
    """``x`` [N, F] -> ``y = x - mean(x over dim 0)`` [N, F]: its signature
    looks batchable, but every output row depends on every input row (what
    any model that normalises over the batch does)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_features])
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1, name="batch_mean"),
        helper.make_node("Sub", ["x", "mean"], ["y"], name="centre"),
    ]
    return _model(helper.make_graph(nodes, "centred", [x], [y]))


def lstm_sequence_first(input_size: int = 3, hidden: int = 5, *, seed: int = 0) -> onnx.ModelProto:
    """An LSTM exported sequence-first, as ``torch.nn.LSTM`` does by default:
    ``x`` [S, B, I] -> ``y`` [S, 1, B, H]. Dim 0 is time: the output at step
    ``t`` depends on every earlier step, so rows along dim 0 are not independent."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((1, 4 * hidden, input_size)) * 0.5).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.5).astype(np.float32)
    b = (rng.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", "B", input_size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", 1, "B", hidden])
    inits = [numpy_helper.from_array(w, "lstm_W"), numpy_helper.from_array(r, "lstm_R"),
             numpy_helper.from_array(b, "lstm_B")]  # fmt: skip
    node = helper.make_node("LSTM", ["x", "lstm_W", "lstm_R", "lstm_B"], ["y"],
                            hidden_size=hidden, name="lstm")  # fmt: skip
    return _model(helper.make_graph([node], "lstm", [x], [y], inits))


def sklearn_shaped_regressor(n_features: int = 4, *, seed: int = 0) -> onnx.ModelProto:
    """Shaped as skl2onnx exports a linear regressor: ``float_input`` [?, F]
    -> ``variable`` [?, 1], dim 0 left unnamed (no ``dim_param``)."""
    rng = np.random.default_rng(seed)
    coef = rng.standard_normal((n_features, 1)).astype(np.float32)
    x = helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, n_features])
    y = helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])
    bias = numpy_helper.from_array(np.array([0.25], np.float32), "intercept")
    nodes = [
        helper.make_node("MatMul", ["float_input", "coef"], ["mm"], name="LinearRegressor"),
        helper.make_node("Add", ["mm", "intercept"], ["variable"], name="Add"),
    ]
    return _model(helper.make_graph(nodes, "skl2onnx", [x], [y],
                                    [numpy_helper.from_array(coef, "coef"), bias]))  # fmt: skip

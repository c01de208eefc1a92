"""ONNX models built on the spot with ``onnx.helper`` (random weights).

* :func:`mlp` - a small MLP with ~16 MB of weights.
* :func:`mobilenet_v2` - MobileNetV2 1.0 at 224x224: the real inverted
  residual blocks (expansion 6, depthwise 3x3, linear bottleneck, the paper's
  channel counts and strides), 3.5 M parameters.
* :func:`resnet50` - ResNet-50 v1.5 at 224x224: bottleneck blocks [3, 4, 6, 3],
  widths 64-512 with expansion 4, stride on the 3x3 conv, 25.5 M parameters.
* :func:`big_tensor` - an elementwise op on float32 [1, 3, 1024, 512]
  (6 MiB in and 6 MiB out): a transport test, almost no compute.
* :func:`sized` - a chain of 2048x2048 MatMuls with about ``mb`` MB of
  weights, for cold start and memory.

BatchNorm is folded into the conv weights and biases, as in any exported
inference graph (onnxruntime fuses Conv+BN itself anyway); ReLU6 is ``Clip``.

Example::

    m = resnet50(batch=1)       # onnx.ModelProto
    feeds = example_feeds(m)    # {"image": np.ndarray}
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "mlp",
    "mobilenet_v2",
    "resnet50",
    "big_tensor",
    "sized",
    "example_feeds",
    "weight_bytes",
]


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


class _Graph:
    """A tiny builder: conv/relu/add nodes with He-scaled random weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def const(self, arr: np.ndarray, kind: str = "w") -> str:
        nm = self.name(kind)
        self.inits.append(numpy_helper.from_array(arr, nm))
        return nm

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> str:
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k), dtype=np.float32) * np.float32(
            np.sqrt(2.0 / fan_in)
        )
        b = np.zeros(cout, np.float32)
        y = self.name("conv")
        p = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.const(w), self.const(b, "b")],
                [y],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[p, p, p, p],
                group=group,
                name=y,
            )
        )
        return y

    def op(self, op: str, inputs: list[str], **attrs: Any) -> str:
        y = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [y], name=y, **attrs))
        return y

    def relu6(self, x: str) -> str:
        lo = self.const(np.array(0.0, np.float32), "lo")
        hi = self.const(np.array(6.0, np.float32), "hi")
        return self.op("Clip", [x, lo, hi])

    def head(self, x: str, cin: int, classes: int = 1000) -> str:
        g = self.op("GlobalAveragePool", [x])
        f = self.op("Flatten", [g], axis=1)
        w = self.rng.standard_normal((cin, classes), dtype=np.float32) * np.float32(
            1 / np.sqrt(cin)
        )
        y = self.op("MatMul", [f, self.const(w)])
        return self.op("Add", [y, self.const(np.zeros(classes, np.float32), "b")])

    def finish(
        self, name: str, inp: str, in_shape: list[Any], out: str, out_shape: list[Any]
    ) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["logits"], name="out"))
        x = helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)
        return _model(helper.make_graph(self.nodes, name, [x], [y], self.inits))


def mobilenet_v2(batch: int | str = 1, seed: int = 1) -> onnx.ModelProto:
    g = _Graph(seed)
    x = g.relu6(g.conv("image", 3, 32, 3, 2))
    cin = 32
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:  # fmt: skip
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            h = x
            if t != 1:
                h = g.relu6(g.conv(h, cin, hidden, 1))
            h = g.relu6(g.conv(h, hidden, hidden, 3, stride, group=hidden))
            h = g.conv(h, hidden, c, 1)  # linear bottleneck
            x = g.op("Add", [x, h]) if stride == 1 and cin == c else h
            cin = c
    x = g.relu6(g.conv(x, cin, 1280, 1))
    y = g.head(x, 1280)
    return g.finish("mobilenet_v2", "image", [batch, 3, 224, 224], y, [batch, 1000])


def resnet50(batch: int | str = 1, seed: int = 2) -> onnx.ModelProto:
    g = _Graph(seed)
    x = g.op("Relu", [g.conv("image", 3, 64, 7, 2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            s = stride if i == 0 else 1
            h = g.op("Relu", [g.conv(x, cin, width, 1)])
            h = g.op("Relu", [g.conv(h, width, width, 3, s)])
            h = g.conv(h, width, width * 4, 1)
            sc = g.conv(x, cin, width * 4, 1, s) if i == 0 else x
            x = g.op("Relu", [g.op("Add", [h, sc])])
            cin = width * 4
    y = g.head(x, 2048)
    return g.finish("resnet50", "image", [batch, 3, 224, 224], y, [batch, 1000])


def mlp(
    batch: int | str = "N", seed: int = 3, d_in: int = 1024, hidden: int = 2048, classes: int = 10
) -> onnx.ModelProto:
    """x [N, 1024] -> 2048 -> 1024 -> logits [N, 10]: ~16.8 MB of weights."""
    g = _Graph(seed)
    h = "x"
    dims = [d_in, hidden, d_in]
    for a, b in zip(dims, dims[1:]):
        w = g.rng.standard_normal((a, b), dtype=np.float32) * np.float32(np.sqrt(2.0 / a))
        h = g.op(
            "Relu",
            [g.op("Add", [g.op("MatMul", [h, g.const(w)]), g.const(np.zeros(b, np.float32), "b")])],
        )
    w = g.rng.standard_normal((d_in, classes), dtype=np.float32) * np.float32(1 / np.sqrt(d_in))
    y = g.op("MatMul", [h, g.const(w)])
    return g.finish("mlp", "x", [batch, d_in], y, [batch, classes])


def big_tensor(shape: tuple[int, ...] = (1, 3, 1024, 512)) -> onnx.ModelProto:
    """x -> x * 0.5 + 1 elementwise (one fused pass): 6 MiB in, 6 MiB out."""
    g = _Graph(4)
    y = g.op(
        "Add",
        [
            g.op("Mul", ["x", g.const(np.array(0.5, np.float32), "s")]),
            g.const(np.array(1.0, np.float32), "c"),
        ],
    )
    return g.finish("big_tensor", "x", list(shape), y, list(shape))


def sized(mb: int, d: int = 2048, seed: int = 5) -> onnx.ModelProto:
    """x [1, d] -> a chain of d x d MatMuls holding about ``mb`` MB (10^6 bytes) of weights."""
    layer = d * d * 4
    n = max(1, round(mb * 1e6 / layer))
    g = _Graph(seed)
    h = "x"
    scale = np.float32(1 / np.sqrt(d))
    for _ in range(n):
        w = g.rng.random((d, d), dtype=np.float32)
        w -= np.float32(0.5)
        w *= scale
        h = g.op("MatMul", [h, g.const(w)])
    return g.finish(f"sized{mb}", "x", [1, d], h, [1, d])


def weight_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in m.graph.initializer)


def _np_dtype(elem: int) -> Any:
    return helper.tensor_dtype_to_np_dtype(elem)


def example_feeds(m: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the graph's inputs (symbolic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in m.graph.input:
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in t.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(_np_dtype(t.elem_type))
    return feeds

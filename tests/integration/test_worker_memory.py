"""What a worker holds in memory: the decrypted weights, and nothing twice.

Measured on the live worker process (``/proc/PID/status``), against a worker
serving a tiny model as the baseline for the interpreter and onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.models import mlp
from tests.prereq import require
from tests.sealed import open_sealed, seal_for_test
from vault.core import lazyplain
from vault.core.lazyplain import BUILD_BUDGET

D, LAYERS = 1024, 16  # 16 MatMul weights of 4 MiB: 64 MiB


def _chain() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits, nodes, prev = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    g = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])],
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) << 10
    return out


def test_no_weight_is_held_twice_with_prepacking_or_without(tmp_path: Path) -> None:
    """By default onnxruntime packs the MatMul weights and the worker gives
    its decrypted originals back (lazy weights); ``--no-prepack`` keeps the
    originals as the only copy. The control, ``--eager-weights``, shows the
    second copy that lazy weights remove."""
    require(lazyplain.supported(), "a kernel with userfaultfd for user-mode faults (Linux 5.11+)")
    weights = LAYERS * D * D * 4
    x = {"x": np.random.default_rng(0).standard_normal((4, D)).astype(np.float32)}
    small = seal_for_test(tmp_path, mlp(), name="small")
    with open_sealed(small) as m:
        m.compute({"x": np.ones((1, 8), np.float32)})
        base = _status(m.pid)  # type: ignore[arg-type]
    s = seal_for_test(tmp_path, _chain(), name="chain")
    mem, outs, lazy = {}, {}, {}
    variants = (("lazy", []), ("eager", ["--eager-weights"]), ("no_prepack", ["--no-prepack"]))
    for label, args in variants:
        with open_sealed(s, worker_args=args) as m:
            outs[label] = m.compute(x)["y"]
            mem[label] = _status(m.pid)  # type: ignore[arg-type]
            lazy[label] = m.health()["weights"]
    # the same packed kernels over the same weights: the same bits
    np.testing.assert_array_equal(outs["lazy"], outs["eager"])
    np.testing.assert_allclose(outs["lazy"], outs["no_prepack"], rtol=1e-4, atol=1e-4)
    # the build read every block (onnxruntime packed it) and gave each back;
    # no call needed one again
    st = lazy["lazy"]
    assert st["read_in_build"] == st["blocks"] and st["refills"] == 0, st
    assert lazy["eager"] is None and lazy["no_prepack"] is not None
    # control: decrypted up front, the originals stay beside the packed copies
    assert mem["eager"]["VmRSS"] - mem["lazy"]["VmRSS"] > 0.7 * weights, (mem, base)
    # the peak is the weights once, with prepacking (lazy) and without: the
    # ciphertext's pages leave the resident set as they are read; lazy weights
    # add the blocks a build keeps in hand (a fixed 16 MiB: 0.25x of this model)
    for label, allowed in (("lazy", 1.15 * weights + BUILD_BUDGET), ("no_prepack", 1.3 * weights)):
        extra = mem[label]["VmHWM"] - base["VmHWM"]
        print(f"{label}: peak beyond a tiny model's worker: {extra / weights:.2f}x the weights")
        assert extra < allowed, (label, extra / weights, mem, base)
    extra = mem["eager"]["VmHWM"] - base["VmHWM"]
    assert extra > 1.7 * weights, (extra / weights, mem, base)

"""Lazy weights in a live worker (vault/core/lazyplain.py): the outputs are
the bits an eager worker computes whatever onnxruntime does with a weight
(packs it, reads it at every call, or both), and a package file changed
under a running worker gives a typed error, never an answer from zeros.

Every model here is above ``LAZY_MIN_BYTES`` (16 MiB of weights), the size
from which the worker decrypts lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.sealed import open_sealed, seal_for_test
from vault.core import lazyplain
from vault.core.errors import IntegrityError
from vault.core.package import Package

D, LAYERS = 1024, 8  # 8 weights of 4 MiB: 32 MiB

pytestmark = pytest.mark.skipif(
    not lazyplain.supported(), reason="no userfaultfd on this kernel: weights decrypt up front"
)


def _packed_and_gathered() -> onnx.ModelProto:
    """Each weight feeds a MatMul (onnxruntime packs it at the build) and a
    Gather by the caller's row ids (which reads the original at every call)."""
    rng = np.random.default_rng(3)
    inits, nodes, prev = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Gather", [f"w{i}", "rows"], [f"g{i}"], axis=0))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("Add", [f"m{i}", f"g{i}"], [out]))
        prev = out
    g = helper.make_graph(
        nodes, "packed_and_gathered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D])],
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _gathered_only() -> onnx.ModelProto:
    """An embedding table only ever gathered: the build never reads it."""
    e = np.random.default_rng(4).standard_normal((8192, D)).astype(np.float32)  # 32 MiB
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, D])],
        [numpy_helper.from_array(e, "table")],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


FEEDS = {
    "x": np.random.default_rng(0).standard_normal((4, D)).astype(np.float32),
    "rows": np.array([5, 900, 17, 1023], np.int64),
}


def test_a_weight_packed_and_read_at_every_call_is_decrypted_again_once(tmp_path: Path) -> None:
    s = seal_for_test(tmp_path, _packed_and_gathered(), name="tied")
    with open_sealed(s, worker_args=["--eager-weights"]) as m:
        want = m.compute(FEEDS)["y"]
    with open_sealed(s) as m:
        st = m.health()["weights"]
        assert st["read_in_build"] == st["blocks"] and st["resident_blocks"] == 0, st
        first = m.compute(FEEDS)["y"]
        st = m.health()["weights"]
        assert st["refills"] > 0, st  # the Gathers read originals given back
        again = m.compute(FEEDS)["y"]
        # the refilled blocks stay: a later call faults nothing more
        assert m.health()["weights"]["faults"] == st["faults"]
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(again, want)


def test_weights_the_build_never_reads_are_decrypted_before_the_first_call(
    tmp_path: Path,
) -> None:
    s = seal_for_test(tmp_path, _gathered_only(), name="embedding")
    ids = {"ids": np.array([0, 8191, 4000, 7], np.int64)}
    with open_sealed(s, worker_args=["--eager-weights"]) as m:
        want = m.compute(ids)["y"]
    with open_sealed(s) as m:
        st = m.health()["weights"]
        assert st["read_in_build"] == 0 and st["resident_blocks"] == st["blocks"], st
        got = m.compute(ids)["y"]
        assert m.health()["weights"]["faults"] == 0  # no call waits for a decrypt
    np.testing.assert_array_equal(got, want)


def test_a_package_rewritten_under_a_running_worker_gives_a_typed_error(tmp_path: Path) -> None:
    """The lazy worker reads the package file again for a block given back;
    a file rewritten since it was opened does not authenticate, and the call
    that needed the block is refused (and every call after it). Control: a
    worker that decrypted everything up front never reads the file again."""
    s = seal_for_test(tmp_path, _packed_and_gathered(), name="tied")
    pkg = Package.load(s.path)
    start, end = pkg._layout.payload_start, pkg._layout.payload_end  # noqa: SLF001
    pkg.close()
    with open_sealed(s, worker_args=["--eager-weights"]) as eager, open_sealed(s) as lazy:
        want = eager.compute(FEEDS)["y"]
        with open(s.path, "r+b") as fh:  # the whole ciphertext, same size, other bytes
            fh.seek(start)
            fh.write(b"\xa5" * (end - start))
        with pytest.raises(IntegrityError, match="changed"):
            lazy.compute(FEEDS)
        with pytest.raises(IntegrityError):
            lazy.compute(FEEDS)  # not a one-off: the weights are gone for good
        assert lazy.health()["weights"]["failed"]  # and the worker still answers
        np.testing.assert_array_equal(eager.compute(FEEDS)["y"], want)

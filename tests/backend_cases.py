"""The ONNX backend node cases (``onnx/backend/test/data/node``), through
plain onnxruntime and through the vault.

``onnx`` 1.22 ships about 1,765 cases (newer wheels may not: the ``test``
extra pins 1.22). A case *passes plainly* when onnxruntime's outputs match
the case's reference outputs; it must then pass through the vault too:
sealed by :func:`vault.seal`, decrypted, checked and loaded exactly as the
worker does (:class:`worker.runtime.Pipeline`, which runs the load-time purity
check), with inputs and outputs encoded and decoded by the wire protocol.

The suite samples the cases (``tests/integration/test_backend_cases.py``);
every case runs with::

    python -m tests.backend_cases            # all cases, in-process pipeline
    python -m tests.backend_cases --worker   # each through a real worker process (~15 min)
    python -m tests.backend_cases --worker --stride 10   # every tenth case
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"

# Cases plain onnxruntime passes that the vault does not, with the reason
# (docs/worker.md lists them too). Empty: every such case passes.
KNOWN_DIFFERENCES: dict[str, str] = {}


def all_cases() -> list[str]:
    return sorted(p for p in glob.glob(str(DATA / "*")) if os.path.exists(f"{p}/model.onnx"))


def _load_value(path: str, tp: onnx.TypeProto) -> Any:
    with open(path, "rb") as fh:
        data = fh.read()
    kind = tp.WhichOneof("value")
    if kind == "sequence_type":
        sp = onnx.SequenceProto()
        sp.ParseFromString(data)
        return numpy_helper.to_list(sp)
    if kind == "map_type":
        mp = onnx.MapProto()
        mp.ParseFromString(data)
        return numpy_helper.to_dict(mp)
    if kind == "optional_type":
        op = onnx.OptionalProto()
        op.ParseFromString(data)
        return numpy_helper.to_optional(op)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return numpy_helper.to_array(t)


@dataclass
class Case:
    name: str
    path: str
    model: onnx.ModelProto
    feeds: dict[str, Any]
    expected: dict[str, Any]


def load_case(path: str) -> Case:
    m = onnx.load(os.path.join(path, "model.onnx"))
    inits = {t.name for t in m.graph.initializer}
    ins = [vi for vi in m.graph.input if vi.name not in inits]
    ds = os.path.join(path, "test_data_set_0")

    def values(prefix: str, vis: list[onnx.ValueInfoProto]) -> dict[str, Any]:
        files = sorted(
            glob.glob(f"{ds}/{prefix}_*.pb"), key=lambda p: int(p.rsplit("_", 1)[1][:-3])
        )
        return {vi.name: _load_value(f, vi.type) for vi, f in zip(vis, files)}

    return Case(
        Path(path).name, path, m, values("input", ins), values("output", list(m.graph.output))
    )


def _special(v: Any) -> bool:
    from vault.core.protocol import ORTVALUE_DTYPES, dtype_name

    try:
        return isinstance(v, np.ndarray) and dtype_name(v.dtype) in ORTVALUE_DTYPES
    except Exception:
        return False


def run_plain(case: Case) -> dict[str, Any]:
    """onnxruntime alone, through OrtValues where numpy has no bridge."""
    import onnxruntime as ort

    from worker.runtime import _from_ortvalue, _to_ortvalue

    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(
        case.model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    special = any(_special(v) for v in case.feeds.values()) or any(
        _special(v) for v in case.expected.values()
    )
    if special:
        vals = sess.run_with_ort_values(names, {k: _to_ortvalue(v) for k, v in case.feeds.items()})
        return {n: _from_ortvalue(v) for n, v in zip(names, vals)}
    return dict(zip(names, sess.run(names, case.feeds)))


def same(got: Any, want: Any, rtol: float = 1e-3, atol: float = 1e-7) -> bool:
    """The backend test's comparison (``onnx.backend.test.runner``)."""
    if want is None or got is None:
        return want is None and got is None
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and set(got) == set(want)
            and all(same(got[k], want[k]) for k in want)
        )
    want, got = np.asarray(want), np.asarray(got)
    if want.dtype == object or want.dtype.kind in "USO":
        return (
            got.shape == want.shape and got.astype(object).tolist() == want.astype(object).tolist()
        )
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if want.dtype.kind not in "fc" and not _special(want):
        return bool(np.array_equal(got, want))
    g, w = (
        got.astype(np.float64 if want.dtype.kind != "c" else np.complex128),
        want.astype(np.float64 if want.dtype.kind != "c" else np.complex128),
    )
    return bool(np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True))


def passes(got: dict[str, Any], case: Case) -> bool:
    return set(got) >= set(case.expected) and all(same(got[k], v) for k, v in case.expected.items())


def _wire(
    values: dict[str, Any], types: dict[str, str], expect: dict[str, str] | None
) -> dict[str, Any]:
    """Encode, copy to bytes as the wire would, decode (with the worker's checks)."""
    from vault.core.protocol import decode_tensors, encode_tensors

    descs, frames = encode_tensors(values, types=types)
    return decode_tensors(descs, [bytes(memoryview(f)) for f in frames], copy=True, expect=expect)


def run_vault(case: Case, directory: str, *, worker: bool = False) -> dict[str, Any]:
    """Seal the case's model and run it as the worker would (or in a worker)."""
    from vault.core.crypto import PublisherKey
    from vault.core.package import Package
    from vault.sealing import seal

    key_path = os.path.join(directory, "publisher.key")
    if not os.path.exists(key_path):
        PublisherKey.generate().save(key_path, os.path.join(directory, "publisher.pub"))
    pk = PublisherKey.load(key_path)
    out = os.path.join(directory, "case.vault")
    res = seal(os.path.join(case.path, "model.onnx"), model_id="case", signing_key=pk, output=out)
    if worker:
        from vault.client import open_with_unsafe_test_key

        with open_with_unsafe_test_key(
            out, key=bytes(res.key), publisher=os.path.join(directory, "publisher.pub")
        ) as model:
            return model.compute(case.feeds)
    from worker.runtime import Pipeline

    with Package.load(out) as pkg:
        plain = pkg.decrypt(res.key)
        try:
            pipe = Pipeline(plain.graphs, plain.files, inputs=pkg.inputs, outputs=pkg.outputs)
        finally:
            plain.release()
    in_types = {str(s["name"]): str(s["dtype"]) for s in pkg.inputs}
    feeds = _wire(case.feeds, in_types, pipe.input_types)
    result = pipe.run(feeds)
    return _wire(result, pipe.output_types, None)


def check(path: str, directory: str, *, worker: bool = False) -> tuple[str, str]:
    """("skip", why) when plain onnxruntime fails the case; ("ok", "") or
    ("fail", why) for the vault."""
    case = load_case(path)
    try:
        if not passes(run_plain(case), case):
            return "skip", "plain onnxruntime gives other outputs"
    except Exception as exc:  # noqa: BLE001 - onnxruntime cannot run it: nothing to compare
        return "skip", f"plain onnxruntime fails ({type(exc).__name__})"
    try:
        got = run_vault(case, directory, worker=worker)
    except Exception as exc:  # noqa: BLE001 - reported as the failure it is
        return "fail", f"{type(exc).__name__}: {str(exc)[:200]}"
    return ("ok", "") if passes(got, case) else ("fail", "outputs differ")


def main(argv: list[str]) -> int:
    worker = "--worker" in argv
    stride = int(argv[argv.index("--stride") + 1]) if "--stride" in argv else 1
    counts = {"ok": 0, "fail": 0, "skip": 0}
    t0 = time.perf_counter()
    for path in all_cases()[::stride]:
        with tempfile.TemporaryDirectory() as d:
            status, why = check(path, d, worker=worker)
        counts[status] += 1
        if status == "fail":
            print(f"FAIL {Path(path).name}: {why}", flush=True)
    dt = time.perf_counter() - t0
    print(f"{counts['ok']} pass through the vault, {counts['fail']} fail, "
          f"{counts['skip']} not passed by plain onnxruntime ({dt:.0f} s)")  # fmt: skip
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

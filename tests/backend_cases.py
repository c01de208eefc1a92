"""The ONNX backend node cases, through plain onnxruntime and through the vault.

The cases are built in memory by onnx's own generators
(``onnx.backend.test.case.node.collect_testcases``: each makes a model, its
inputs and the reference outputs, seeded, so every run builds the same
cases), which every onnx wheel ships; the ``node`` data files built from them
left the wheels after 1.22, so nothing here pins onnx. ``onnx`` 1.23.2 builds
1,884 cases (1.22's files held 1,765). A case *passes plainly* when
onnxruntime's outputs match the case's reference outputs; it must then pass
through the vault too: sealed by :func:`vault.seal`, decrypted, checked and
loaded exactly as the worker does (:class:`worker.runtime.Pipeline`, which
runs the load-time purity check), with inputs and outputs encoded and
decoded by the wire protocol.

The suite samples the cases (``tests/integration/test_backend_cases.py``);
every case runs with::

    python -m tests.backend_cases            # all cases, in-process pipeline
    python -m tests.backend_cases --worker   # each through a real worker process (~15 min)
    python -m tests.backend_cases --worker --stride 10   # every tenth case
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

# Cases plain onnxruntime passes that the vault does not, with the reason
# (docs/worker.md lists them too). Empty: every such case passes.
KNOWN_DIFFERENCES: dict[str, str] = {}


@functools.cache
def _generated() -> dict[str, Any]:
    """onnx's node test cases, built once per process (about 5 s)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the generators divide by zero on purpose
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = collect_testcases(None)  # onnx 1.22 has no default
    return {c.name: c for c in cases if c.model is not None and c.data_sets}


def all_cases() -> list[str]:
    """The names of every node case (``test_abs``, ``test_softmax_axis_0_expanded``, ...)."""
    return sorted(_generated())


def _value(v: Any) -> Any:
    """A generator's value as the wire carries it: a TensorProto (float8, int4, ...)
    as its array; sequences element by element; None (an empty optional) as is."""
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, list):
        return [_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return np.asarray(v)
    return v


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    feeds: dict[str, Any]
    expected: dict[str, Any]


def load_case(name: str) -> Case:
    tc = _generated()[name]
    m = tc.model
    inits = {t.name for t in m.graph.initializer}
    ins = [vi.name for vi in m.graph.input if vi.name not in inits]
    inputs, outputs = tc.data_sets[0]
    return Case(
        name,
        m,
        {n: _value(v) for n, v in zip(ins, inputs)},
        {vi.name: _value(v) for vi, v in zip(m.graph.output, outputs)},
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

    from vault.core.ortvalues import to_ortvalue as _to_ortvalue
    from worker.runtime import _from_ortvalue

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
    res = seal(case.model, model_id="case", signing_key=pk, output=out)
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


def check(name: str, directory: str, *, worker: bool = False) -> tuple[str, str]:
    """What the vault must do is what plain onnxruntime does: ("ok", "") when the
    vault matches onnx's reference outputs as plain onnxruntime does; ("ok",
    "onnxruntime") when plain onnxruntime differs from the reference (onnx's
    generators and onnxruntime disagree on, e.g., casts to int4) and the vault
    gives onnxruntime's own outputs; ("skip", why) when plain onnxruntime cannot
    run the case, or it is random (nothing to compare); ("fail", why) otherwise."""
    case = load_case(name)
    try:
        plain = run_plain(case)
    except Exception as exc:  # noqa: BLE001 - onnxruntime cannot run it: nothing to compare
        return "skip", f"plain onnxruntime fails ({type(exc).__name__})"
    want, how = case, ""
    if not passes(plain, case):
        if _RANDOM.search(name):
            return "skip", "random outputs: nothing to compare"
        want = Case(case.name, case.model, case.feeds, plain)
        how = "onnxruntime"
    try:
        got = run_vault(case, directory, worker=worker)
    except Exception as exc:  # noqa: BLE001 - reported as the failure it is
        return "fail", f"{type(exc).__name__}: {str(exc)[:200]}"
    if passes(got, want):
        return "ok", how
    return "fail", "outputs differ" + (" from plain onnxruntime's" if how else "")


_RANDOM = re.compile(r"random|bernoulli|dropout.*(mask|training)", re.IGNORECASE)


def main(argv: list[str]) -> int:
    worker = "--worker" in argv
    stride = int(argv[argv.index("--stride") + 1]) if "--stride" in argv else 1
    counts = {"ok": 0, "ort": 0, "fail": 0, "skip": 0}
    t0 = time.perf_counter()
    names = all_cases()[::stride]
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            status, why = check(name, d, worker=worker)
        counts["ort" if status == "ok" and why else status] += 1
        if status == "fail":
            print(f"FAIL {name}: {why}", flush=True)
    dt = time.perf_counter() - t0
    print(f"{len(names)} cases (onnx {onnx.__version__}): {counts['ok']} match onnx's reference "
          f"through the vault as through plain onnxruntime, {counts['ort']} match plain "
          f"onnxruntime where it differs from the reference, {counts['fail']} fail, "
          f"{counts['skip']} cannot be compared (plain onnxruntime fails, or random) "
          f"({dt:.0f} s)")  # fmt: skip
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

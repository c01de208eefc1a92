"""onnxruntime values for the dtypes its numpy bridge lacks (bfloat16, float8, int4).

``session.run`` fails on such a tensor, in either direction (``RuntimeError:
No corresponding Numpy type for Tensor Type. bfloat16``); numpy holds them
through ml_dtypes (what :mod:`vault.core.protocol` puts on the wire), and
onnxruntime takes and gives them only as ``OrtValue``\\ s. :func:`run` is a
``session.run`` that converts where needed: inputs of these dtypes go in as
OrtValues (``run`` accepts them beside numpy arrays), outputs of these dtypes
come back through ``run_with_ort_values``. Used by the caller's side of the
hybrid (its head runs in-process) and by ``vault split`` (profile, accuracy
check); onnxruntime is imported on first use.

Example::

    outs = run(session, {"x": arr_bf16})      # {"y": ml_dtypes.bfloat16 array, ...}
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ComputeError, InputError
from .protocol import ORTVALUE_DTYPES, dtype_from_name, dtype_name

__all__ = [
    "SPECIAL_ONNX_CODES",
    "from_ortvalue",
    "is_special_array",
    "is_special_type",
    "run",
    "special_raw",
    "to_ortvalue",
    "value_of",
]

# the dtypes onnxruntime's numpy bridge lacks: their ONNX element types
SPECIAL_ONNX_CODES = {
    "bfloat16": 16, "float8_e4m3fn": 17, "float8_e4m3fnuz": 18, "float8_e5m2": 19,
    "float8_e5m2fnuz": 20, "uint4": 21, "int4": 22,
}  # fmt: skip
# onnxruntime's names for them in a session's types ("tensor(float8e4m3fn)")
_ORT_NAME = {n.replace("_", ""): n for n in SPECIAL_ONNX_CODES}


def is_special_type(ort_type: str) -> bool:
    """Whether an onnxruntime type string (``tensor(bfloat16)``) needs OrtValues."""
    return ort_type.startswith("tensor(") and ort_type[7:-1] in _ORT_NAME


def is_special_array(v: Any) -> bool:
    """Whether ``v`` is a numpy array of a dtype that needs an OrtValue."""
    if not isinstance(v, np.ndarray) or v.dtype.kind in "biuOUS":  # the common ones, fast
        return False  # (ml_dtypes' kinds vary: "V" for bfloat16, "f" for float8_e5m2)
    try:
        return dtype_name(v.dtype) in ORTVALUE_DTYPES
    except Exception:  # noqa: BLE001 - a structured dtype: not ours to convert
        return False


def to_ortvalue(arr: Any) -> Any:
    """A numpy array (ml_dtypes' bfloat16, float8, int4 included) as an OrtValue."""
    import onnxruntime as ort

    if not isinstance(arr, np.ndarray):
        raise InputError("sequence, map and optional values cannot be mixed with this dtype")
    name = dtype_name(arr.dtype)
    code = SPECIAL_ONNX_CODES.get(name)
    if code is None:
        return ort.OrtValue.ortvalue_from_numpy(arr)
    raw = special_raw(arr, name)
    if name not in ("int4", "uint4"):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, code)
    v = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), code)
    if raw.size:
        ctypes.memmove(v.data_ptr(), raw.ctypes.data, raw.size)
    return v


def special_raw(arr: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    """The bytes onnxruntime (and ONNX's raw_data) holds for a bfloat16,
    float8 or 4-bit array: 4-bit values two to a byte, the first in the low
    nibble."""
    raw: Any = np.ascontiguousarray(arr).view(np.uint16 if name == "bfloat16" else np.uint8)
    if name not in ("int4", "uint4"):
        return raw  # type: ignore[no-any-return]
    nib = (raw.reshape(-1) & 0x0F).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return np.ascontiguousarray(nib[0::2] | (nib[1::2] << 4))


def from_ortvalue(v: Any) -> Any:
    """An OrtValue tensor as a numpy array (ml_dtypes for bfloat16, float8, int4)."""
    t = v.data_type()
    name = _ORT_NAME.get(t[7:-1]) if t.startswith("tensor(") else None
    if name is None:
        return v.numpy()
    shape = tuple(v.shape())
    n = int(np.prod(shape, dtype=np.int64))
    four_bit = name in ("int4", "uint4")
    nbytes = (n + 1) // 2 if four_bit else n * (2 if name == "bfloat16" else 1)
    raw = np.empty(nbytes, np.uint8)
    if nbytes:
        ctypes.memmove(raw.ctypes.data, v.data_ptr(), nbytes)
    if four_bit:
        nib = np.empty(nbytes * 2, np.uint8)
        nib[0::2], nib[1::2] = raw & 0x0F, raw >> 4
        vals = nib[:n].astype(np.int8)
        if name == "int4":
            vals = np.where(vals >= 8, vals - 16, vals).astype(np.int8)
        return vals.astype(dtype_from_name(name)).reshape(shape)
    return raw.view(dtype_from_name(name)).reshape(shape)


def run(
    session: Any, feeds: Mapping[str, Any], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """``session.run`` by output name, for any dtype onnxruntime runs: arrays of
    bfloat16, float8 or int4 go in as OrtValues, such outputs come back as
    ml_dtypes arrays. Plain models take the plain path (no copy, no OrtValue).

    Outputs of those dtypes come from ``run_with_ort_values``, which takes
    OrtValues only, with every other output of the call in the same run (a
    sequence or map among them comes back as ``run`` gives it); with a
    string or sequence input beside them (onnxruntime makes no OrtValue of
    those) the call is refused, :class:`ComputeError`."""
    want = list(names) if names is not None else [o.name for o in session.get_outputs()]
    special = {o.name for o in session.get_outputs() if is_special_type(o.type)}
    ins = {k: to_ortvalue(v) if is_special_array(v) else v for k, v in feeds.items()}
    wide = [n for n in want if n in special]
    if not wide:
        return dict(zip(want, session.run(want, ins)))
    import onnxruntime as ort

    try:
        all_ov = {k: v if isinstance(v, ort.OrtValue) else to_ortvalue(v) for k, v in ins.items()}
    except (InputError, RuntimeError) as exc:
        raise ComputeError(
            f"outputs {', '.join(wide)} are of a dtype onnxruntime gives only as OrtValues, "
            "which it takes only with every input an OrtValue: a string, sequence or map "
            "input cannot be one"
        ) from exc
    # one run for every output: a second plain run for the sequences and maps
    # (as before) doubled the time a profile measured and drew random ops twice
    vals = session.run_with_ort_values(want, all_ov)
    return {n: value_of(v) for n, v in zip(want, vals)}


def value_of(
    v: Any, passthrough: Callable[[str], Any] | None = None, run_options: Any = None
) -> Any:
    """An OrtValue as ``session.run`` gives it: None for an absent optional,
    a list or dict for a sequence or map (onnxruntime's own conversion, by a
    session whose output is its input: ``passthrough(type)``, run with
    ``run_options``; by default one built with onnx, which the worker does
    not import: it gives its own), numpy (ml_dtypes for bfloat16, float8,
    int4) for a tensor."""
    if not v.has_value():  # first: data_type() of an absent optional crashes onnxruntime
        return None
    if v.is_tensor():
        return from_ortvalue(v)
    sess = (passthrough or _passthrough)(v.data_type())
    return sess.run(["v"], {"v": v}, run_options)[0]


_PASSTHROUGH: dict[str, Any] = {}
_PASSTHROUGH_LOCK = threading.Lock()


def _type_proto(t: str) -> Any:
    """onnxruntime's type text (``seq(map(int64,tensor(float)))``) as an onnx TypeProto."""
    from onnx import TensorProto, helper

    if t.startswith("tensor(") and t.endswith(")"):
        return helper.make_tensor_type_proto(getattr(TensorProto, t[7:-1].upper()), None)
    if t.startswith("seq(") and t.endswith(")"):
        return helper.make_sequence_type_proto(_type_proto(t[4:-1]))
    if t.startswith("optional(") and t.endswith(")"):
        return helper.make_optional_type_proto(_type_proto(t[9:-1]))
    if t.startswith("map(") and t.endswith(")"):
        key, _, value = t[4:-1].partition(",")
        return helper.make_map_type_proto(getattr(TensorProto, key.upper()), _type_proto(value))
    raise ComputeError(f"unsupported value type {t}")


def _passthrough(t: str) -> Any:
    """A session whose output is its input, of onnxruntime's type ``t``
    (cached per type): ``run`` on it turns a sequence or map OrtValue into
    Python as ``session.run`` would. (The worker builds the same with a
    hand-written protobuf, ``worker.runtime._passthrough``: it does not
    import onnx.)"""
    with _PASSTHROUGH_LOCK:
        sess = _PASSTHROUGH.get(t)
        if sess is None:
            import onnxruntime as ort
            from onnx import helper

            vi = helper.make_value_info("v", _type_proto(t))
            graph = helper.make_graph([], "passthrough", [vi], [vi])
            model = helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10
            )
            so = ort.SessionOptions()
            so.intra_op_num_threads = so.inter_op_num_threads = 1
            so.log_severity_level = 3
            sess = _PASSTHROUGH[t] = ort.InferenceSession(
                model.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
        return sess

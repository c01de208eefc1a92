"""onnxruntime sessions for a decrypted pipeline, built from memory only.

A :class:`Pipeline` owns one session per stage graph (normally one: the
composed pre → model → post graph) and exposes only the *declared* pipeline
inputs and outputs. Every request is checked against that public signature
before onnxruntime sees it, so an internal tensor name gets exactly the same
:class:`~vault.core.errors.InputError` as a name that does not exist; onnxruntime's
own error text (which names internal nodes) never leaves this module.

Session options that would leak the model are refused: an optimised-model
dump (``optimized_model_filepath``), profiling files and verbose logs.

Example::

    pipe = Pipeline([graph_bytes], {}, inputs=sig_in, outputs=sig_out)
    pipe.run({"x": np.ones((1, 3), np.float32)}, ["y"])
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from vault.core.errors import (
    ComputeError,
    ConfigError,
    InputError,
    IntegrityError,
    VaultError,
)
from vault.core.graphs import check_graph
from vault.core.ortthreads import apply_spin_policy
from vault.core.ortvalues import (
    SPECIAL_ONNX_CODES,
    is_special_array,
    is_special_type,
    special_raw,
    to_ortvalue,
    value_of,
)
from vault.core.protocol import ORTVALUE_DTYPES, dtype_from_name, dtype_name, is_tensor_type

from .initializers import _enc_varint, _ld, add_to_options, zero_copy_graph

__all__ = ["Pipeline", "choose_providers", "session_options", "signature_of"]

_ALLOWED_OPTIONS = {
    "intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "execution_mode",
}  # fmt: skip
_LEAKY_OPTIONS = {
    "optimized_model_filepath": "would write the optimised model (the architecture) to disk",
    "enable_profiling": "would write a profile naming every node",
    "profile_file_prefix": "would write a profile naming every node",
    "log_severity_level": "verbose logs name every node",
    "log_verbosity_level": "verbose logs name every node",
}
_ONNX_TO_NAME = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool", "tensor(string)": "string", "tensor(complex64)": "complex64",
    "tensor(complex128)": "complex128",
}  # fmt: skip


ort.set_default_logger_severity(4)
_RUN_OPTIONS = ort.RunOptions()
_RUN_OPTIONS.log_severity_level = 4


_FLAGS = {0: False, 1: True, "0": False, "1": True}


def _flag(options: Mapping[str, Any] | None, key: str) -> bool | None:
    """An on/off option: None when absent; 0, 1, False, True, "0" or "1"
    (a config file's string included), else a ConfigError, never a guess
    (``bool("0")`` is True)."""
    value = (options or {}).get(key)
    if value is None:
        return None
    if isinstance(value, (bool, int, str)) and value in _FLAGS:
        return _FLAGS[value]
    raise ConfigError(f"session option {key!r} must be 0 or 1, got {value!r}")


def session_options(options: Mapping[str, Any] | None = None) -> ort.SessionOptions:
    """SessionOptions with every leaky knob off; ConfigError for a refused option."""
    so = ort.SessionOptions()
    # fatal only: onnxruntime's warnings *and* error lines name graph nodes
    so.log_severity_level = 4
    so.log_verbosity_level = 0
    so.enable_profiling = False
    so.optimized_model_filepath = ""
    # onnxruntime's pools spin only within a run and 50 us after it (where
    # onnxruntime can bound a spin; else not at all): an unbounded idle
    # spinner steals the cores the caller and the I/O need, and no spinning
    # makes every parallel section wake its threads (vault/core/ortthreads.py).
    # {"allow_spinning": 0} turns it off, {"allow_spinning": 1} unbounds it.
    allow = _flag(options, "allow_spinning")
    apply_spin_policy(so, allow)
    # Prepacking copies MatMul/Conv weights into the kernels' layout. Over
    # weights the worker lends in place (the decrypted buffer) that copy is a
    # second one onnxruntime cannot free: {"prepack": 0} trades it for speed
    # (docs/benchmarks.md, section 6, has both figures).
    if _flag(options, "prepack") is False:
        so.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in (options or {}).items():
        if key in ("allow_spinning", "prepack"):
            continue
        if key in _LEAKY_OPTIONS:
            raise ConfigError(f"session option {key!r} is refused: it {_LEAKY_OPTIONS[key]}")
        if key not in _ALLOWED_OPTIONS:
            raise ConfigError(
                f"unknown session option {key!r}; allowed: {sorted(_ALLOWED_OPTIONS)}"
            )
        if key == "graph_optimization_level":
            value = ort.GraphOptimizationLevel(int(value))
        elif key == "execution_mode":
            value = ort.ExecutionMode(int(value))
        setattr(so, key, value)
    return so


def choose_providers(
    providers: Sequence[str] | None = None, device: str | None = None
) -> list[Any]:
    """CPU by default; CUDA when asked for and present (ConfigError when absent)."""
    wanted = list(providers or [])
    dev = (device or "").lower()
    want_cuda = dev.startswith("cuda") or dev == "gpu" or "CUDAExecutionProvider" in wanted
    for p in wanted:
        if p not in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            raise ConfigError(
                f"provider {p!r} is not allowed (CPUExecutionProvider, CUDAExecutionProvider)"
            )
    if dev and not (want_cuda or dev == "cpu"):
        raise ConfigError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'")
    if not want_cuda:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError(
            "CUDA was asked for but onnxruntime-gpu with a CUDA device is not available"
        )
    device_id = int(dev.split(":", 1)[1]) if ":" in dev else 0
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def _wipe_bytes(b: bytes) -> None:
    """Overwrite an immutable ``bytes`` in place (CPython layout: the data
    starts at ``bytes.__basicsize__ - 1``). onnxruntime's binding only takes
    ``bytes`` for a model, so this is how that one extra copy gets cleared."""
    if type(b) is bytes and len(b) > 1:
        ctypes.memset(id(b) + bytes.__basicsize__ - 1, 0, len(b))


def _session(
    graph: Any, files: Mapping[str, Any], make_so: Callable[[], ort.SessionOptions],
    providers: list[Any], keep: list[Any],
) -> Any:  # fmt: skip
    """A session; what it needs kept alive (OrtValues over ``files``) goes into ``keep``.

    First with the weights in place (no copy). onnxruntime's graph
    optimisers that fold weights into other weights (a Conv followed by an
    Add or Mul, constant folding) read initializers from the graph, not from
    the supplied values, so such a graph fails to load that way (it never
    reads anything else: the placeholder is a directory); it is then loaded
    through the in-memory-files route, which copies the weights."""
    zero_copy = zero_copy_graph(graph, files) if files else None
    if zero_copy is not None:
        so = make_so()
        graph_in_place, views = zero_copy
        vals = add_to_options(so, views)
        sess = _try_session(graph_in_place, so, providers)
        if sess is not None:
            keep += [views, vals]
            return sess
        del vals, views, so
    so = make_so()
    if files:
        names = list(files)
        bufs = [files[n] for n in names]
        so.add_external_initializers_from_files_in_memory(names, bufs, [len(b) for b in bufs])
    failed: list[str] = []
    sess = _try_session(graph, so, providers, failed)
    if sess is not None:
        return sess
    # raised outside any handler so no __context__ carries onnxruntime's text
    raise ComputeError(f"the pipeline could not be loaded ({failed[0]})")


def _try_session(
    graph: Any, so: ort.SessionOptions, providers: list[Any], failed: list[str] | None = None
) -> Any:
    model = bytes(graph)
    try:
        return ort.InferenceSession(model, so, providers=providers)
    except Exception as exc:  # onnxruntime's text names nodes: only its kind is kept
        if failed is not None:
            failed.append(load_failure(exc))
        return None
    finally:
        _wipe_bytes(model)
        del model


# what onnxruntime's load error says, in words that name no node, tensor or op
_LOAD_KINDS = (
    ("ShapeInferenceError", "tensor shapes in the graph disagree (onnxruntime's shape "
                            "inference), as where one stage's output does not fit the next; "
                            "vault seal refuses such a pipeline, naming the tensors"),
    ("TypeInferenceError", "tensor types in the graph disagree (onnxruntime's type "
                           "inference); vault seal refuses such a pipeline, naming them"),
    ("NOT_IMPLEMENTED", "an operator is not implemented by this onnxruntime for its types"),
    ("Unsupported model IR version", "the model needs a newer onnxruntime (its IR version)"),
    ("is under development and support for this is limited",
     "the model needs a newer onnxruntime (its opset)"),
    ("INVALID_PROTOBUF", "the graph is not a valid ONNX model"),
    ("INVALID_GRAPH", "the graph is not valid"),
    ("Failed to allocate", "out of memory"),
    ("bad_alloc", "out of memory"),
)  # fmt: skip


def load_failure(exc: BaseException) -> str:
    """Why onnxruntime could not build a session, for whoever asked: its
    exception's class and, where its text says which kind of failure it is,
    that kind in the vault's words (a fixed list: onnxruntime's text names
    the model's nodes and ops, which a caller may not read). Before, only the
    class: ``the pipeline could not be loaded (Fail)``, with no cause."""
    text = str(exc)
    kind = next((words for key, words in _LOAD_KINDS if key in text), None)
    if kind is None:
        return type(exc).__name__
    return f"{type(exc).__name__}: {kind}"


def signature_of(session: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The public signature of a session, as a manifest would list it."""

    def conv(args: Any) -> list[dict[str, Any]]:
        return [
            {"name": a.name, "dtype": _ort_type_name(a.type), "shape": list(a.shape)} for a in args
        ]

    return conv(session.get_inputs()), conv(session.get_outputs())


def _ort_type_name(t: str) -> str:
    """onnxruntime's type text (``seq(map(int64,tensor(float)))``) as a wire
    value type (``sequence<map<int64,float32>>``)."""
    if t in _ONNX_TO_NAME:
        return _ONNX_TO_NAME[t]
    if t.startswith("tensor(") and t.endswith(")"):
        inner = t[7:-1]
        return _ORT_SPECIAL.get(inner, inner)
    for ort_kind, kind in (("seq(", "sequence"), ("optional(", "optional")):
        if t.startswith(ort_kind) and t.endswith(")"):
            return f"{kind}<{_ort_type_name(t[len(ort_kind) : -1])}>"
    if t.startswith("map(") and t.endswith(")"):
        key, _, value = t[4:-1].partition(",")
        return f"map<{_ort_type_name(f'tensor({key})')},{_ort_type_name(value)}>"
    return t


# dtypes onnxruntime's numpy bridge lacks: their ONNX codes, and onnxruntime's names
_ONNX_CODE = SPECIAL_ONNX_CODES
_ORT_SPECIAL = {n.replace("_", ""): n for n in _ONNX_CODE}  # "float8e4m3fn" -> "float8_e4m3fn"


def _np_dtype(name: str) -> np.dtype[Any] | None:
    """The numpy dtype a declared input must have (None: check by name)."""
    try:
        dt = dtype_from_name(name)
    except Exception:  # an odd manifest dtype (or a sequence/map): check by name
        return None
    return None if dt == np.dtype(object) else dt


def _from_ortvalue(v: Any) -> Any:
    """An OrtValue as ``session.run`` would give it (``vault.core.ortvalues.value_of``),
    sequences and maps through this module's own pass-through sessions."""
    return value_of(v, _passthrough, _RUN_OPTIONS)


# --- values onnxruntime's Python API makes no OrtValue of -------------------------
#
# run_with_ort_values (the only run that returns a bfloat16, float8 or int4
# tensor) takes OrtValues only, and onnxruntime makes none from a string array
# or a list ("only supported from non-string numpy arrays"); plain run takes
# them, but fails on such an output. So for a run that must give one, the
# other feeds become OrtValues through a small model of our own whose outputs
# they are (constants, a SequenceConstruct), built per call without onnx (the
# worker does not import it); and a sequence or map output becomes Python
# through a model whose output is its input, run with plain run.

_ELEM_CODE = {
    "float": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
    "string": 8, "bool": 9, "float16": 10, "double": 11, "uint32": 12, "uint64": 13,
    "complex64": 14, "complex128": 15, **{n.replace("_", ""): c for n, c in _ONNX_CODE.items()},
}  # fmt: skip
_WIRE_CODE = {
    **{wire: _ELEM_CODE[t[7:-1]] for t, wire in _ONNX_TO_NAME.items()},
    **_ONNX_CODE,
}  # wire dtype name -> ONNX element type


def _pb_varint(n: int) -> bytes:
    return _enc_varint(n & ((1 << 64) - 1))  # a negative int64 as protobuf writes it


def _pb(field: int, value: int | bytes | str) -> bytes:
    """One protobuf field: an int as a varint, bytes or text length-delimited."""
    if isinstance(value, int):
        return _pb_varint(field << 3) + _pb_varint(value)
    return _ld(field, value.encode() if isinstance(value, str) else value)


def _type_proto(t: str) -> bytes:
    """onnxruntime's type text (``seq(map(int64,tensor(float)))``) as a TypeProto."""
    if t.startswith("tensor(") and t.endswith(")"):
        return _pb(1, _pb(1, _ELEM_CODE[t[7:-1]]))
    if t.startswith("seq(") and t.endswith(")"):
        return _pb(4, _pb(1, _type_proto(t[4:-1])))
    if t.startswith("optional(") and t.endswith(")"):
        return _pb(9, _pb(1, _type_proto(t[9:-1])))
    if t.startswith("map(") and t.endswith(")"):
        key, _, value = t[4:-1].partition(",")
        return _pb(5, _pb(1, _ELEM_CODE[key]) + _pb(2, _type_proto(value)))
    raise ComputeError(f"unsupported value type {t}")


def _tensor_proto(name: str, arr: Any) -> bytes:
    if not isinstance(arr, np.ndarray):
        raise InputError("a sequence's elements must be tensors")
    out = b"".join(_pb(1, int(d)) for d in arr.shape) + _pb(8, name)
    if arr.dtype.kind in "OUS":
        # as onnxruntime's run takes a string array: str as UTF-8, anything else as str()
        items = (e if isinstance(e, str) else str(e) for e in arr.reshape(-1).tolist())
        return out + _pb(2, 8) + b"".join(_pb(6, e.encode()) for e in items)
    wire = dtype_name(arr.dtype)
    if wire in _ONNX_CODE:
        raw = special_raw(arr, wire).tobytes()
    else:
        raw = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
    return out + _pb(2, _WIRE_CODE[wire]) + _pb(9, raw)


def _model_proto(nodes: bytes, inputs: bytes, outputs: bytes, inits: bytes) -> bytes:
    graph = nodes + _pb(2, "v") + inits + inputs + outputs
    # IR 10 and opset 21: int4 and float8 constants, SequenceConstruct, SequenceEmpty
    return _pb(1, 10) + _pb(7, graph) + _pb(8, _pb(1, "") + _pb(2, 21))


def _helper_session(model: bytes) -> Any:
    so = session_options()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    finally:
        _wipe_bytes(model)  # it holds the caller's values


_PASSTHROUGH: dict[str, Any] = {}
_PASSTHROUGH_LOCK = threading.Lock()


def _passthrough(t: str) -> Any:
    """A session whose output is its input, of type ``t`` (cached per type)."""
    with _PASSTHROUGH_LOCK:
        sess = _PASSTHROUGH.get(t)
        if sess is None:
            vi = _pb(1, "v") + _pb(2, _type_proto(t))
            sess = _PASSTHROUGH[t] = _helper_session(
                _model_proto(b"", _pb(11, vi), _pb(12, vi), b"")
            )
        return sess


# Sequence items a call may pass this way: each is an initializer of the
# model built for the call, whose build grows faster than linearly with
# them (measured: 20,000 one-element items 0.7 s, 65,536 11 s, 200,000
# 148 s, against 0.03-0.1 s for plain onnxruntime, which this path cannot use)
MAX_SEQUENCE_ITEMS = 4096
# ... and strings: each is a protobuf field of that model, copied several
# times on the way (a 56 MB request of 4 M short strings took a worker up
# 929 MB, twice what the same strings cost a plain run)
MAX_STRING_ITEMS = 1 << 18
MAX_STRING_BYTES = 64 << 20


def _strings_in(value: Any) -> tuple[int, int]:
    """(how many strings, their bytes at most) in a tensor or a sequence of them."""
    if isinstance(value, (list, tuple)):
        parts = [_strings_in(v) for v in value]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        if value.size > MAX_STRING_ITEMS:  # refused on the count: no need to read them
            return value.size, 0
        return value.size, sum(
            len(x.encode("utf-8", "surrogatepass")) if isinstance(x, str) else len(x)
            if isinstance(x, bytes) else 32 for x in value.flat
        )  # fmt: skip
    return 0, 0


def _make_ortvalues(items: list[tuple[str, Any]]) -> tuple[list[Any], Any]:
    """OrtValues of values onnxruntime's Python API has no constructor for
    (string tensors, sequences), each given with its input's type text; and
    the session that made them (kept until the run is over)."""
    n = sum(len(v) for _, v in items if isinstance(v, (list, tuple)))
    if n > MAX_SEQUENCE_ITEMS:
        raise InputError(
            f"the sequence inputs hold {n} items; beside a bfloat16, float8 or int4 output "
            f"a call takes at most {MAX_SEQUENCE_ITEMS} (each is made into an onnxruntime "
            "value one by one): send fewer items a call"
        )
    strings = [_strings_in(v) for _, v in items]
    count, size = sum(c for c, _ in strings), sum(b for _, b in strings)
    if count > MAX_STRING_ITEMS or size > MAX_STRING_BYTES:
        raise InputError(
            f"the string inputs hold {count} strings of {size} bytes; beside a bfloat16, "
            f"float8 or int4 output a call takes at most {MAX_STRING_ITEMS} strings and "
            f"{MAX_STRING_BYTES} bytes of them: send fewer a call"
        )
    nodes, inits, outputs = [], [], []
    for k, (t, value) in enumerate(items):
        while t.startswith("optional("):  # an optional input takes its value itself
            t = t[9:-1]
        out = f"o{k}"
        if t.startswith("tensor("):
            inits.append(_pb(5, _tensor_proto(out, value)))
        elif t.startswith("seq(tensor(") and isinstance(value, (list, tuple)):
            names = [f"{out}_{j}" for j in range(len(value))]
            inits += [_pb(5, _tensor_proto(n, e)) for n, e in zip(names, value)]
            node = b"".join(_pb(1, n) for n in names) + _pb(2, out)
            if names:
                node += _pb(4, "SequenceConstruct")
            else:
                dtype = _pb(1, "dtype") + _pb(3, _ELEM_CODE[t[11:-2]]) + _pb(20, 2)
                node += _pb(4, "SequenceEmpty") + _pb(5, dtype)
            nodes.append(_pb(1, node))
        else:  # a map, or a sequence of maps or sequences: no ONNX operator builds one
            raise ComputeError(
                f"a {t} value cannot be passed with a bfloat16, float8 or int4 output"
            )
        outputs.append(_pb(12, _pb(1, out) + _pb(2, _type_proto(t))))
    sess = _helper_session(_model_proto(b"".join(nodes), b"", b"".join(outputs), b"".join(inits)))
    return sess.run_with_ort_values([f"o{k}" for k in range(len(items))], {}, _RUN_OPTIONS), sess


def _run_stage(sess: Any, in_types: Mapping[str, str], special_out: frozenset[str],
               feeds: Mapping[str, Any], want: list[str]) -> list[Any]:  # fmt: skip
    """One session's run, with any value kind ``session.run`` takes.

    ``run`` takes every kind, bfloat16, float8 and int4 tensors as OrtValues,
    but gives none of those three: a run that must give one goes through
    ``run_with_ort_values`` (OrtValues come back; :func:`_from_ortvalue`
    reads them). An absent optional is left out of the feeds either way."""
    if special_out.isdisjoint(want):
        plain = {k: to_ortvalue(v) if is_special_array(v) else v
                 for k, v in feeds.items() if v is not None}  # fmt: skip
        return sess.run(want, plain, _RUN_OPTIONS)  # type: ignore[no-any-return]
    vals: dict[str, Any] = {}
    pending: list[tuple[str, str, Any]] = []
    for k, v in feeds.items():
        if v is None or isinstance(v, ort.OrtValue):
            if v is not None:
                vals[k] = v
        elif isinstance(v, np.ndarray) and v.dtype.kind not in "OUS":
            vals[k] = to_ortvalue(v)
        else:
            pending.append((k, in_types[k], v))
    made, keep = _make_ortvalues([(t, v) for _, t, v in pending]) if pending else ([], None)
    vals.update(zip((k for k, _, _ in pending), made))
    res = sess.run_with_ort_values(want, vals, _RUN_OPTIONS)
    del keep
    return res  # type: ignore[no-any-return]


def _check_dims(name: str, declared: Sequence[Any], shape: Sequence[Any]) -> None:
    if declared and len(shape) != len(declared):
        raise InputError(f"input {name!r} must have rank {len(declared)}, got shape {list(shape)}")
    for i, (want, have) in enumerate(zip(declared, shape)):
        if isinstance(want, int) and want >= 0 and want != have:
            raise InputError(
                f"input {name!r} dimension {i} must be {want}, got shape {list(shape)}"
            )


_KIND = {"sequence": (list, tuple), "map": (dict,)}


def _check_value(name: str, dtype: str, value: Any) -> None:
    """A sequence, map or optional input has the right Python shape."""
    kind = dtype.partition("<")[0]
    if kind == "optional":
        if value is not None:
            inner = dtype[len("optional<") : -1]
            if is_tensor_type(inner):
                if not isinstance(value, np.ndarray) or dtype_name(value.dtype) != inner:
                    raise InputError(f"input {name!r} must be {dtype}")
            else:
                _check_value(name, inner, value)
        return
    if not isinstance(value, _KIND.get(kind, ())):
        raise InputError(f"input {name!r} must be a {dtype}, got {type(value).__name__}")


class Pipeline:
    """The decrypted pipeline's sessions and its public signature."""

    def __init__(
        self,
        graphs: Sequence[Any],
        files: Mapping[str, Any] | None = None,
        *,
        inputs: Sequence[Mapping[str, Any]] | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        providers: Sequence[str] | None = None,
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        owner: Any = None,
    ) -> None:
        """``owner`` (optional) holds the memory ``files`` views: the sessions
        use it in place, and :meth:`close` calls ``owner.release()`` (wipe,
        free) once they are dropped and no run is in flight."""
        if not graphs:
            raise ConfigError("the package holds no graph")
        chosen = choose_providers(providers, device)
        sizes = {name: memoryview(buf).nbytes for name, buf in (files or {}).items()}
        for i, g in enumerate(graphs):
            # whoever built the package: pure computation only (no path, no custom op)
            check_graph(g, sizes, where=f"stage {i}")
        self._stages: list[tuple[Any, list[str], list[str]]] | None = []
        self._keep: list[Any] = []
        self._owner = owner
        self._lock = threading.Lock()
        self._in_flight = 0
        for g in graphs:
            sess = _session(g, files or {}, lambda: session_options(options), chosen, self._keep)
            self._stages.append(
                (sess, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
            )
        first = self._stages[0][0]
        self.provider: str = first.get_providers()[0]
        # onnxruntime's packed weight copies: on unless {"prepack": 0} (worker --no-prepack)
        self.prepack = _flag(options, "prepack") is not False
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        if inputs is None or outputs is None:
            sig_in, sig_out = signature_of(first)
            if len(self._stages) > 1:
                sig_out = signature_of(self._stages[-1][0])[1]
            inputs = inputs if inputs is not None else sig_in
            outputs = outputs if outputs is not None else sig_out
        self.inputs = [dict(s) for s in inputs]
        self.outputs = [dict(s) for s in outputs]
        self._in = {s["name"]: (str(s["dtype"]), list(s.get("shape") or [])) for s in self.inputs}
        self._np_dtypes = {n: _np_dtype(d) for n, (d, _) in self._in.items()}
        # per tensor input: its dtype, rank (None: any) and the dims fixed to a
        # size, so a call's header is checked without re-reading the signature
        self._dims = {
            n: (d, len(shp) if shp else None,
                tuple((i, w) for i, w in enumerate(shp) if isinstance(w, int) and w >= 0))
            for n, (d, shp) in self._in.items() if is_tensor_type(d)
        }  # fmt: skip
        self.input_types = {n: d for n, (d, _) in self._in.items()}
        self._required = frozenset(
            n for n, (d, _) in self._in.items() if not d.startswith("optional<")
        )
        self.output_types = {str(s["name"]): str(s["dtype"]) for s in self.outputs}
        self._out_names = [str(s["name"]) for s in self.outputs]
        self._out_set = frozenset(self._out_names)
        # onnxruntime's numpy bridge has no bfloat16, float8 or int4: such
        # pipelines go through OrtValues
        self._ortvalues = any(
            str(s["dtype"]) in ORTVALUE_DTYPES for s in (*self.inputs, *self.outputs)
        )
        # per stage: its inputs' type texts, and its outputs onnxruntime's
        # session.run cannot give (bfloat16, float8, int4: _run_stage)
        self._in_types = [
            {a.name: a.type for a in sess.get_inputs()} for sess, _, _ in self._stages
        ]
        self._special_out = [
            frozenset(a.name for a in sess.get_outputs() if is_special_type(a.type))
            for sess, _, _ in self._stages
        ]  # fmt: skip
        # such a tensor anywhere in a chain of stages (_run_chain)
        self._special_chain = self._ortvalues or any(
            is_special_type(t)
            for types in self._in_types for t in types.values()
        ) or any(self._special_out)  # fmt: skip

    @property
    def closed(self) -> bool:
        return self._stages is None

    def weights(self) -> dict[str, Any] | None:
        """What lazy weights did (``vault.core.lazyplain``: blocks the build
        read and gave back, faults, refills); None when decrypted up front."""
        stats = getattr(self._owner, "stats", None)
        return stats() if stats is not None else None

    def close(self) -> None:
        """Drop the sessions (the weights go with them); in-flight runs finish,
        then the owner's buffer is wiped and freed."""
        with self._lock:
            self._stages = None
            idle = self._in_flight == 0
        if idle:
            self._teardown()

    def _teardown(self) -> None:
        with self._lock:
            keep, self._keep = self._keep, []
            owner, self._owner = self._owner, None
        del keep  # the OrtValues and views over the owner's memory
        if owner is not None:
            owner.release()

    # -- checks ---------------------------------------------------------------

    def check_inputs(self, feeds: Mapping[str, Any]) -> None:
        """Names, dtypes, ranks and fixed sizes, as onnxruntime checks them.
        Symbolic dims are not tied across inputs (onnxruntime does not tie
        them either: a broadcastable mask may have another batch size)."""
        for name in feeds:
            if name not in self._in:
                raise InputError(f"no input named {name!r}; inputs are {sorted(self._in)}")
        for name, (dtype, shape) in self._in.items():
            if name not in feeds:
                if dtype.startswith("optional<"):
                    continue
                raise InputError(f"missing input {name!r}")
            arr = feeds[name]
            if not is_tensor_type(dtype):
                _check_value(name, dtype, arr)
                continue
            if not isinstance(arr, np.ndarray):
                raise InputError(f"input {name!r} must be a {dtype} tensor")
            want_dt = self._np_dtypes.get(name)
            if want_dt is None or arr.dtype != want_dt:  # fast path: one dtype compare
                got = dtype_name(arr.dtype)
                if got != dtype:
                    raise InputError(f"input {name!r} must be {dtype}, got {got}")
            _check_dims(name, shape, arr.shape)

    def check_declared_shapes(self, descs: Any) -> None:
        """Rank and fixed sizes of the tensors a request header announces,
        before any frame is decoded (a string input declared ``[3]`` is
        refused at once when the header says ``[30000000]``)."""
        if not isinstance(descs, list):
            return  # the decoder reports the malformed header
        rules = self._dims
        for d in descs:
            # a malformed descriptor (a name that is not a string, ...) is the
            # decoder's to report, as a ProtocolError
            if not isinstance(d, dict):
                continue
            name = d.get("name")
            if not isinstance(name, str):
                continue
            rule = rules.get(name)
            if rule is None:  # not an input, or not a tensor: the decoder's
                continue
            have = d.get("shape")
            # another dtype, or an unknown one, is the decoder's to report
            if d.get("dtype") != rule[0] or not isinstance(have, list):
                continue
            rank, fixed = rule[1], rule[2]
            if rank is not None and len(have) != rank:
                _check_dims(name, self._in[name][1], have)  # raises, with the words
            for i, want in fixed:
                if i < len(have) and have[i] != want:
                    _check_dims(name, self._in[name][1], have)

    def check_outputs(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return self._out_names
        for n in names:
            # the same words for an internal tensor as for a missing one
            if not isinstance(n, str) or n not in self._out_set:
                raise InputError(f"no output named {n!r}; outputs are {self._out_names}")
        return list(dict.fromkeys(names))

    # -- run ------------------------------------------------------------------

    def run(
        self,
        feeds: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        *,
        checked: bool = False,
    ) -> dict[str, Any]:
        """``checked``: the caller has already checked names, dtypes and
        dimensions against this signature (the worker's request handler does,
        from the header, before decoding): only missing inputs are left."""
        with self._lock:
            stages = self._stages
            if stages is None:
                raise ComputeError("the pipeline was unloaded")
            self._in_flight += 1
        try:
            result = self._run(stages, feeds, outputs, checked)
            failed = getattr(self._owner, "failed", None)
            if failed:  # lazy weights that could not be decrypted again read as zeros
                raise IntegrityError(failed)
            return result
        finally:
            with self._lock:
                self._in_flight -= 1
                last = self._in_flight == 0 and self._stages is None
            if last:
                self._teardown()

    def _run(
        self,
        stages: list[tuple[Any, list[str], list[str]]],
        feeds: Mapping[str, Any],
        outputs: Sequence[str] | None,
        checked: bool = False,
    ) -> dict[str, Any]:
        if not checked:
            self.check_inputs(feeds)
        elif not self._required.issubset(feeds):
            missing = sorted(self._required.difference(feeds))
            raise InputError(f"missing input {missing[0]!r}")
        want = self.check_outputs(outputs)
        failed = ""
        try:
            if len(stages) == 1 and self._ortvalues:
                res = _run_stage(stages[0][0], self._in_types[0], self._special_out[0], feeds, want)
                return {n: _from_ortvalue(v) if isinstance(v, ort.OrtValue) else v
                        for n, v in zip(want, res)}  # fmt: skip
            if len(stages) == 1:
                res = stages[0][0].run(want, dict(feeds), _RUN_OPTIONS)
                return dict(zip(want, res))
            return self._run_chain(stages, feeds, want)
        except VaultError as exc:  # the vault's own refusal (a limit, a kind): its words
            own: VaultError | None = exc
        except Exception as exc:  # onnxruntime's text names nodes: keep only the class
            failed, own = type(exc).__name__, None
        # raised outside the handler so no __context__ carries onnxruntime's text
        if own is not None:
            own.__context__ = own.__cause__ = None
            raise own
        raise ComputeError(f"inference failed ({failed})")

    def _run_chain(
        self,
        stages: list[tuple[Any, list[str], list[str]]],
        feeds: Mapping[str, np.ndarray[Any, Any]],
        want: list[str],
    ) -> dict[str, np.ndarray[Any, Any]]:
        values: dict[str, Any] = dict(feeds)
        if self._device == "cpu" and self._special_chain:
            # a bfloat16, float8 or int4 tensor in a stage's signature: onnxruntime's
            # numpy bridge has none of them (each run failed, RuntimeError), so a
            # stage that gives one gives OrtValues, which the next stage takes
            # as they are (strings, sequences and absent optionals included)
            for i, (sess, ins, outs) in enumerate(stages):
                stage_feeds = {n: values[n] for n in ins if n in values}
                res = _run_stage(sess, self._in_types[i], self._special_out[i], stage_feeds, outs)
                values.update(zip(outs, res))
            return {n: _from_ortvalue(values[n]) if isinstance(values[n], ort.OrtValue)
                    else values[n] for n in want}  # fmt: skip
        if self._device == "cpu":
            # On CPU every value already lives in host memory: plain run() is
            # the cheapest way to hand one stage's outputs to the next.
            for sess, ins, outs in stages:
                res = sess.run(outs, {n: values[n] for n in ins if n in values}, _RUN_OPTIONS)
                values.update(zip(outs, res))
            return {n: values[n] for n in want}
        # On a GPU, IO binding keeps intermediates on the device between stages.
        for sess, ins, outs in stages:
            binding = sess.io_binding()
            for n in ins:
                v = values[n]
                if isinstance(v, np.ndarray):
                    binding.bind_cpu_input(n, v)
                else:
                    binding.bind_ortvalue_input(n, v)
            for n in outs:
                binding.bind_output(n, self._device)
            sess.run_with_iobinding(binding, _RUN_OPTIONS)
            values.update(zip(outs, binding.get_outputs()))
        return {
            n: (values[n] if isinstance(values[n], np.ndarray) else values[n].numpy()) for n in want
        }

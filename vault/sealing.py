"""Seal an ONNX pipeline (pre → model → post) into one ``.vault`` package.

What sealing does, in order:

1. Load each stage. External-data weights are read from the model's own
   folder only: an absolute path or one that escapes the folder is refused
   (a path in a model is a file read on someone else's machine).
2. Check each stage: the purity check the worker runs again at load
   (:func:`vault.core.graphs.check_graph`: no external data by path, no
   custom-op domain, only values the channel carries: tensors and sequences,
   maps and optionals of them), then well-formedness no stricter than
   onnxruntime: ``onnx.checker`` (without strict shape inference), and where
   it objects, onnxruntime itself decides (an IR 3 model whose initializers
   are not graph inputs, a function body the checker cannot infer).
3. Wire the stages: pre outputs feed model inputs and model outputs feed post
   inputs by name (or by an explicit ``io_map``); an element-type mismatch
   is refused, a shape disagreement is a warning naming both ends (declared
   shapes are advisory, as in onnxruntime: an exporter's wrong declaration
   runs). Whether the pipeline can run at all is onnxruntime's to say: each
   stored graph is loaded as the worker loads it before anything is
   written (:func:`check_loads`), and one that does not load (a pre graph
   computing ``[N, 32]`` for a model whose weights take ``[N, 64]``) is
   refused with onnxruntime's reason and the disagreeing shapes. The pipeline returns the last
   stage's outputs: an output of one stage that the next does not read is
   dropped, and a warning names it (``vault seal --post`` prints it).
4. Move every weight larger than 1 KiB out of the graph into an in-memory
   "file" (onnxruntime later takes it from memory with
   ``add_external_initializers_from_files_in_memory``), so graphs stay small
   and models past protobuf's 2 GB limit work.
5. Compose the stages into one graph (one session runs the whole pipeline;
   on a GPU intermediates never leave the device). Stage-internal names get a
   stage prefix (in If/Loop/Scan bodies too); the public inputs and outputs
   keep their names. When the stages cannot be composed (conflicting opsets)
   they are stored in order, the worker chains them, and the result's
   ``warnings`` say so.
6. Encrypt (STREAM AES-256-GCM), sign (Ed25519), write atomically.

Example::

    from vault import seal
    from vault import PublisherKey
    result = seal("model.onnx", pre="pre.onnx", model_id="resnet", signing_key=PublisherKey.load("publisher.key"),
                  output="resnet.vault")
    result.key   # the package key, in memory: register it or keep it safe
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .core import crypto as _crypto
from .core.batchcheck import check_rows, session_in_memory
from .core.errors import SealError, UnsafeModelError, VaultError
from .core.graphs import ALLOWED_DOMAINS, check_graph
from .core.package import FORMAT_VERSION, build_plaintext, write_package
from .core.protocol import is_tensor_type

__all__ = ["SealResult", "seal", "ALLOWED_DOMAINS"]

EXTERNALISE_THRESHOLD = 1024
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_PROTOBUF_LIMIT = 2**31 - 1

ModelLike = str | os.PathLike[str] | onnx.ModelProto | bytes


@dataclass
class SealResult:
    """What :func:`seal` made. ``key`` is secret: register it, then drop it."""

    path: str
    model_id: str
    key_id: str
    key: bytearray = field(repr=False)
    digest: str
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def wipe_key(self) -> None:
        _crypto.zeroize(self.key)


# --- loading and checking ----------------------------------------------------


def _load_stage(src: ModelLike, stage: str) -> onnx.ModelProto:
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        if _has_external(model):
            raise SealError(
                f"{stage}: an in-memory model with external-data references has no folder to "
                "read them from; pass the model's path instead"
            )
        return model
    if isinstance(src, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(src))
        except Exception as exc:
            raise SealError(f"{stage}: not an ONNX model ({exc.__class__.__name__})") from exc
    path = os.fspath(src)
    try:
        model = onnx.load(path, load_external_data=False)
    except FileNotFoundError as exc:
        raise SealError(f"{stage}: {path}: no such file") from exc
    except Exception as exc:
        raise SealError(f"{stage}: {path}: not an ONNX model ({exc.__class__.__name__})") from exc
    base = os.path.dirname(os.path.abspath(path))
    _check_external_paths(model, base, stage)
    if _has_external(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, base)
        except (OSError, ValueError) as exc:
            raise SealError(f"{stage}: cannot read external data: {exc}") from exc
    return model


def _all_tensors(model: onnx.ModelProto) -> Iterable[TensorProto]:
    return onnx.external_data_helper._get_all_tensors(model)


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in _all_tensors(model))


def _check_external_paths(model: onnx.ModelProto, base: str, stage: str) -> None:
    real_base = os.path.realpath(base)
    for t in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ":" in loc:
            raise SealError(
                f"{stage}: tensor {t.name!r} names external data at {loc!r}: only relative paths "
                "inside the model's folder are accepted"
            )
        target = os.path.realpath(os.path.join(real_base, loc))
        if os.path.commonpath([target, real_base]) != real_base:
            raise SealError(
                f"{stage}: tensor {t.name!r} names external data {loc!r} outside the model's "
                "folder; refused (a path in a model is a file read)"
            )


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _check_stage(model: onnx.ModelProto, stage: str) -> None:
    # pure computation first (the worker's own check), on the graph without
    # its large weights: they were read from the model's folder already
    light = _without_weights(model) if _has_large_weights(model) else model
    check_graph(light.SerializeToString(), where=stage)
    check_well_formed(model, stage, light=light)


def check_well_formed(
    model: onnx.ModelProto, where: str, *, light: onnx.ModelProto | None = None
) -> None:
    """The one well-formedness policy for what is sealed or split: ``onnx.checker``
    (without strict shape inference), and where it objects, onnxruntime decides.

    The checker is stricter than onnxruntime in ways exporters hit: an IR 3 model
    whose initializers are not graph inputs; a model of a newer IR version than
    the installed onnx knows (``ir_version 14 is higher than the checker's (13)``);
    a graph output whose inferred type has no shape. A model onnxruntime loads
    runs in the worker exactly as it does there, so onnxruntime has the last word.
    ``light``: the model with its large weights moved out (for one past 2 GiB,
    which only the checker sees). Raises :class:`SealError` naming ``where``."""
    try:
        if not _too_big(model):
            onnx.checker.check_model(model)
        else:  # too big to serialise: check the graph with its weights moved out
            onnx.checker.check_model(light if light is not None else _without_weights(model))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if _too_big(model) or not _onnxruntime_loads(model):
            raise SealError(f"{where}: ONNX check failed: {_first_line(exc)}") from exc


def _has_large_weights(model: onnx.ModelProto) -> bool:
    return any(_tensor_nbytes(t) >= EXTERNALISE_THRESHOLD for t in model.graph.initializer)


def _onnxruntime_loads(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime builds a session for ``model`` (its weights are
    inline and it passed the purity check: nothing is read from disk)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # any failure to load: the checker's message stands
        return False
    return True


# onnxruntime's words for a model newer than it (an IR version, an opset)
_NEWER_THAN_HERE = re.compile(r"Unsupported model IR version|opset \d+ is under development|"
                              r"only guaranteed to support .* opset", re.IGNORECASE)  # fmt: skip


def check_loads(
    graphs: Iterable[tuple[str, bytes]],
    files: Mapping[str, Any],
    seams: Iterable[str] = (),
    warnings: list[str] | None = None,
) -> bool:
    """Refuse a pipeline no worker could load: each stored graph is loaded by
    onnxruntime as the worker loads it (weights from the in-memory files),
    with its graph optimisations off (what fails there is the graph itself:
    its types and shapes, as onnxruntime resolves them, an operator it does
    not have). A pre graph that computes ``[N, 32]`` in front of a model
    whose weights take ``[N, 64]`` sealed with a warning and failed every
    load with ``the pipeline could not be loaded (Fail)``. Declared shapes
    alone never refuse: onnxruntime has the last word (an exporter's wrong
    declaration loads and runs). ``seams``: the stages' declared shapes that
    disagree, named in the refusal. Raises :class:`SealError` with
    onnxruntime's own reason (the publisher's own model: its text helps).
    An operator this onnxruntime has no CPU kernel for is not refused but
    put in ``warnings``: a GPU worker may have one (a model for CUDA sealed
    on a laptop without it); so is a model newer than this onnxruntime (its
    IR version or an opset it does not know: a newer worker may load it).
    Returns whether every graph loaded here."""
    import onnxruntime as ort

    names = list(files)
    bufs = [np.frombuffer(files[n], np.uint8) for n in names]
    loaded = True
    for stage, data in graphs:
        why = ""
        try:
            session_in_memory(data, names, bufs, optimise=False)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types, in the vault's words
            why = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _first_line(exc))
            why = " ".join(why.split())[:400]
            if type(exc).__name__ == "NotImplemented":  # no kernel here; a GPU's may have it
                if warnings is not None:
                    warnings.append(f"the {stage} does not load on this CPU: {why}; only a "
                                    "worker whose provider has that operator can run it")  # fmt: skip
                loaded = False
                continue
            if _NEWER_THAN_HERE.search(why):
                if warnings is not None:
                    warnings.append(f"the {stage} is newer than this onnxruntime "
                                    f"({ort.__version__}): {why}; a worker needs one that loads it")  # fmt: skip
                loaded = False
                continue
        if why:
            where = "pipeline" if stage == "pipeline" else f"{stage} stage"
            seam = "; ".join(seams)
            raise SealError(
                f"the {where} does not load in onnxruntime, so no worker could run it: {why}"
                + (f" (the stages disagree: {seam})" if seam else "")
            )
    return loaded


def _too_big(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is past what protobuf can serialise (2 GiB). Counted
    from the weights, with a margin: ``ByteSize()`` is not reliable past 2 GiB."""
    weights = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    return weights > _PROTOBUF_LIMIT - (64 << 20)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _copy_fields(dst: Any, src: Any, *, skip: str) -> None:
    """Copy every set field of one protobuf message into another, but ``skip``."""
    for desc, value in src.ListFields():
        if desc.name == skip:
            continue
        # protobuf 5+ has is_repeated; older releases only the label
        repeated = getattr(desc, "is_repeated", None)
        if repeated is None:
            repeated = desc.label == desc.LABEL_REPEATED
        if repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.type == desc.TYPE_MESSAGE:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are graph inputs of the
    same type and shape: the checker and shape inference need no weight bytes
    (small shape-defining constants stay), so a model past 2 GiB can be
    checked. Built field by field: a whole-model copy would duplicate every
    weight first."""
    light = onnx.ModelProto()
    graph = model.graph
    _copy_fields(light, model, skip="graph")
    _copy_fields(light.graph, graph, skip="initializer")
    inputs = {vi.name for vi in graph.input}
    for t in graph.initializer:
        if t.data_type != TensorProto.STRING and _tensor_nbytes(t) >= EXTERNALISE_THRESHOLD:
            if t.name not in inputs:
                light.graph.input.append(
                    helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                )
        else:
            light.graph.initializer.append(t)
    return light


# --- public signature ----------------------------------------------------------


def _dtype_name(elem_type: int) -> str:
    if elem_type == TensorProto.STRING:
        return "string"
    if elem_type == TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name)
    except Exception:
        return str(TensorProto.DataType.Name(elem_type)).lower()


def _shape(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return dims


def _type_name(tp: onnx.TypeProto, where: str) -> str:
    """A value type as the wire names it (see vault.core.protocol)."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return _dtype_name(tp.tensor_type.elem_type)
    if kind == "sequence_type":
        return f"sequence<{_type_name(tp.sequence_type.elem_type, where)}>"
    if kind == "optional_type":
        return f"optional<{_type_name(tp.optional_type.elem_type, where)}>"
    if kind == "map_type":
        key = _dtype_name(tp.map_type.key_type)
        return f"map<{key},{_type_name(tp.map_type.value_type, where)}>"
    raise UnsafeModelError(f"{where}: a {kind} value cannot cross the worker channel")


def _describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    tp = vi.type
    if tp.HasField("optional_type") and tp.optional_type.elem_type.HasField("tensor_type"):
        shape_of: Any = onnx.ValueInfoProto(name=vi.name, type=tp.optional_type.elem_type)
    else:
        shape_of = vi if tp.HasField("tensor_type") else None
    return {
        "name": vi.name,
        "dtype": _type_name(tp, vi.name),
        "shape": _shape(shape_of) if shape_of is not None else None,
    }


def _public_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _shapes_compatible(a: list[Any] | None, b: list[Any] | None) -> bool:
    if a is None or b is None:
        return True
    if len(a) != len(b):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int) and x != y) for x, y in zip(a, b))


def _wire(
    up: onnx.ModelProto,
    down: onnx.ModelProto,
    up_name: str,
    down_name: str,
    io_map: Mapping[str, str] | None,
    warnings: list[str] | None = None,
    seams: list[str] | None = None,
) -> list[tuple[str, str]]:
    """Pairs (upstream output, downstream input). Element types must agree;
    declared shapes are advisory (onnxruntime does not enforce an output's
    declared shape either): a disagreement is a warning naming both ends, and
    is put in ``seams`` (``seal`` names it when the pipeline does not load)."""
    outs = {vi.name: vi for vi in up.graph.output}
    ins = {vi.name: vi for vi in _public_inputs(down)}
    if io_map:
        pairs = list(io_map.items())
        for o, i in pairs:
            if o not in outs:
                raise SealError(f"io map: {up_name} has no output {o!r} (outputs: {sorted(outs)})")
            if i not in ins:
                raise SealError(f"io map: {down_name} has no input {i!r} (inputs: {sorted(ins)})")
    else:
        pairs = [(n, n) for n in ins if n in outs]
        if not pairs:
            raise SealError(
                f"{up_name} outputs {sorted(outs)} share no name with {down_name} inputs "
                f"{sorted(ins)}; pass an explicit mapping "
                f"(--map {up_name if up_name != 'model' else down_name}:OUT=IN)"
            )
    fed = {i for _, i in pairs}
    read = {o for o, _ in pairs}
    dropped = [n for n in outs if n not in read]
    if dropped and warnings is not None:
        # the sealed pipeline's outputs are the last stage's: these leave nothing
        warnings.append(
            f"{up_name} outputs {dropped} are not read by {down_name}: the sealed pipeline "
            f"does not return them (its outputs are {down_name}'s); to keep one, pass it "
            f"through {down_name} (an Identity node to an output)"
        )
    missing = [n for n in ins if n not in fed]
    if missing:
        raise SealError(
            f"{down_name} inputs {missing} are not fed by any {up_name} output; map them explicitly"
        )
    for o, i in pairs:
        a, b = _describe(outs[o]), _describe(ins[i])
        if a["dtype"] != b["dtype"]:
            raise SealError(
                f"{up_name} output {o!r} ({a['dtype']}, shape {a['shape']}) does not match "
                f"{down_name} input {i!r} ({b['dtype']}, shape {b['shape']})"
            )
        if not _shapes_compatible(a["shape"], b["shape"]):
            if warnings is not None:
                warnings.append(
                    f"{up_name} output {o!r} declares shape {a['shape']} but {down_name} "
                    f"input {i!r} declares {b['shape']}; declared shapes are advisory, and "
                    "onnxruntime loads the pipeline: sealed as is"
                )
            if seams is not None:
                seams.append(
                    f"{up_name} output {o!r} declares shape {a['shape']}, {down_name} input "
                    f"{i!r} {b['shape']}"
                )
    return pairs


# --- weights out of the graph ---------------------------------------------------


def _tensor_nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        return int(info.get("length", 0))
    n = 1
    for d in t.dims:
        n *= d
    try:
        return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return 0


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    for f in (
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "string_data",
    ):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _externalise(model: onnx.ModelProto, location: str) -> bytearray:
    """Move each large top-level initializer into one in-memory 'file'."""
    chosen: list[tuple[TensorProto, bytes]] = []
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            continue
        if _tensor_nbytes(t) < EXTERNALISE_THRESHOLD:
            continue
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        chosen.append((t, raw))
    total = 0
    for _, raw in chosen:
        total = (total + len(raw) + 63) // 64 * 64
    blob = bytearray(total)
    off = 0
    for t, raw in chosen:
        blob[off : off + len(raw)] = raw
        _set_external(t, location, off, len(raw))
        off = (off + len(raw) + 63) // 64 * 64
    return blob


# --- composition -------------------------------------------------------------------


def _prefix_graph(g: onnx.GraphProto, p: str) -> None:
    """Prefix every value and node name of ``g`` and of every graph nested in
    it (If/Loop/Scan bodies), so references to outer-scope names (a weight
    used inside a branch) follow the rename. Function bodies keep their own
    scope and are left alone."""

    def ren(n: str) -> str:
        return p + n if n else n

    for vi in (*g.input, *g.output, *g.value_info):
        vi.name = ren(vi.name)
    for t in g.initializer:
        t.name = ren(t.name)
    for st in g.sparse_initializer:
        st.values.name = ren(st.values.name)
        if st.indices.name:
            st.indices.name = ren(st.indices.name)
    for ann in g.quantization_annotation:
        ann.tensor_name = ren(ann.tensor_name)
        for e in ann.quant_parameter_tensor_names:
            e.value = ren(e.value)
    for node in g.node:
        node.name = ren(node.name)
        node.input[:] = [ren(n) for n in node.input]
        node.output[:] = [ren(n) for n in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _prefix_graph(attr.g, p)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _prefix_graph(sub, p)


def _merge_opsets(models: list[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for m in models:
        for op in m.opset_import:
            dom = "" if op.domain == "ai.onnx" else op.domain
            if versions.setdefault(dom, op.version) != op.version:
                raise ValueError(
                    f"the stages import different versions of opset {dom or 'ai.onnx'!r} "
                    f"({versions[dom]} and {op.version})"
                )
    return [helper.make_opsetid(d, v) for d, v in sorted(versions.items())]


def _compose(
    stages: list[tuple[str, onnx.ModelProto]],
    links: list[list[tuple[str, str]]],
) -> onnx.ModelProto:
    """One graph from the stages; public names unchanged, internals prefixed.
    ValueError when the stages cannot share one graph (conflicting opsets or
    model-local functions)."""
    if len(stages) == 1:
        return stages[0][1]
    models = [m for _, m in stages]
    opsets = _merge_opsets(models)
    functions: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for m in models:
        for f in m.functions:
            key = (f.domain, f.name, getattr(f, "overload", ""))
            if key in functions and functions[key] != f:
                raise ValueError(f"two stages define different functions {f.domain}:{f.name}")
            functions[key] = f
    ir = max(m.ir_version for m in models)
    merged = helper.make_model(
        helper.make_graph([], "vault-pipeline", [], []),
        opset_imports=opsets,
        producer_name="vault",
    )
    merged.ir_version = ir
    merged.functions.extend(functions.values())
    g = merged.graph
    first, last = stages[0][0], stages[-1][0]
    first_inputs = _public_inputs(models[0])
    for vi in first_inputs:
        g.input.append(vi)
        g.node.append(
            helper.make_node("Identity", [vi.name], [f"{first}/{vi.name}"], name=f"in/{vi.name}")
        )
    for k, (name, m) in enumerate(stages):
        gm = onnx.GraphProto()
        gm.CopyFrom(m.graph)
        inits = {t.name for t in gm.initializer}
        _prefix_graph(gm, f"{name}/")
        if k > 0:
            prev = stages[k - 1][0]
            for o, i in links[k - 1]:
                g.node.append(
                    helper.make_node(
                        "Identity", [f"{prev}/{o}"], [f"{name}/{i}"], name=f"link/{name}/{i}"
                    )
                )
        g.node.extend(gm.node)
        g.initializer.extend(gm.initializer)
        g.sparse_initializer.extend(gm.sparse_initializer)
        g.value_info.extend(gm.value_info)
        g.quantization_annotation.extend(gm.quantization_annotation)
        if ir < 4:  # IR 3: initializers are graph inputs too
            g.input.extend(vi for vi in gm.input if vi.name[len(name) + 1 :] in inits)
    for vi in models[-1].graph.output:
        g.node.append(
            helper.make_node("Identity", [f"{last}/{vi.name}"], [vi.name], name=f"out/{vi.name}")
        )
        g.output.append(vi)
    return merged


# --- seal ----------------------------------------------------------------------------


def seal(
    model: ModelLike,
    *,
    model_id: str,
    signing_key: _crypto.PublisherKey,
    output: str | os.PathLike[str],
    pre: ModelLike | None = None,
    post: ModelLike | None = None,
    io_map: Mapping[str, Mapping[str, str]] | None = None,
    split_points: Iterable[str] = (),
    key: bytes | bytearray | None = None,
    chunk_size: int = _crypto.DEFAULT_CHUNK_SIZE,
    compose: bool = True,
    progress: Callable[[int, int], None] | None = None,
    now: _dt.datetime | None = None,
    batchable: bool = False,
) -> SealResult:
    """Seal a pipeline into ``output``; returns the package key in memory.

    ``io_map`` may hold ``{"pre": {pre_out: model_in}, "post": {model_out: post_in}}``
    when names differ between stages.

    ``batchable=True`` declares, in the signed manifest, that dim 0 of every
    input and output is a batch of independent rows, so a worker service may
    join calls of different callers into one batch. It is checked here by
    running the pipeline on random rows together and apart
    (:func:`vault.core.batchcheck.check_rows`); a pipeline whose output rows
    depend on other rows is refused with a :class:`SealError` naming the
    output and the row. Without it, calls are never joined.
    """
    if not _MODEL_ID.match(model_id):
        raise SealError(f"model id {model_id!r}: use 1-128 letters, digits, '.', '_', ':' or '-'")
    if key is not None and len(key) != _crypto.KEY_SIZE:
        raise SealError("package key must be 32 bytes")
    io_map = io_map or {}
    stages: list[tuple[str, onnx.ModelProto]] = []
    if pre is not None:
        stages.append(("pre", _load_stage(pre, "pre")))
    stages.append(("model", _load_stage(model, "model")))
    if post is not None:
        stages.append(("post", _load_stage(post, "post")))
    for name, m in stages:
        _check_stage(m, name)
    warnings: list[str] = []
    first = stages[0]
    overridable = sorted({t.name for t in first[1].graph.initializer}
                         & {vi.name for vi in first[1].graph.input})  # fmt: skip
    if overridable:
        named = ", ".join(map(repr, overridable[:5]))
        if len(overridable) > 5:
            named += f" and {len(overridable) - 5} more"
        warnings.append(
            f"graph input(s) {named} of the {first[0]} stage "
            "have initializers: callers cannot feed them (fed weights could expose the rest "
            "of the model); the initializers are used. Make an input without an "
            "initializer to take it from callers"
        )
    links: list[list[tuple[str, str]]] = []
    seams: list[str] = []
    for (un, um), (dn, dm) in zip(stages, stages[1:]):
        links.append(
            _wire(um, dm, un, dn, io_map.get(un if un != "model" else dn), warnings, seams)
        )

    model_graph = dict(stages)["model"]
    known = {n for node in model_graph.graph.node for n in node.output} | {
        vi.name for vi in model_graph.graph.input
    }
    splits = list(split_points)
    for s in splits:
        if s not in known:
            raise SealError(f"split point {s!r} is not a tensor of the model graph")

    # compose first (while weights are still inline, so the checker sees a
    # complete model), then move weights out of whatever graphs remain
    parts: list[tuple[str, onnx.ModelProto]] = stages
    composed = len(stages) == 1
    if compose and len(stages) > 1:
        try:
            merged = _compose(stages, links)
            if not _too_big(merged):
                check_well_formed(merged, "pipeline")
            parts = [("pipeline", merged)]
            composed = True
        except (ValueError, SealError) as exc:
            parts = stages  # e.g. conflicting opsets: the worker chains them
            warnings.append(
                f"the stages could not be composed into one graph ({_first_line(exc)}); "
                "they are stored separately and the worker runs them in turn"
            )
    files: list[tuple[str, Any]] = []
    graphs: list[tuple[str, bytes]] = []
    for name, m in parts:
        blob = _externalise(m, f"{name}.weights")
        if blob:
            files.append((f"{name}.weights", blob))
        graphs.append((name, m.SerializeToString()))
    sizes = {loc: len(blob) for loc, blob in files}
    for name, data in graphs:
        check_graph(data, sizes, where=name)  # exactly what the worker checks at load

    first, last = stages[0][1], stages[-1][1]
    inputs = [_describe(vi) for vi in _public_inputs(first)]
    outputs = [_describe(vi) for vi in last.graph.output]
    nested = [o for o in outputs if not is_tensor_type(o["dtype"])]
    if nested:
        named = ", ".join(f"{o['name']!r} ({o['dtype']})" for o in nested)
        one = len(nested) == 1
        warnings.append(
            f"{'output' if one else 'outputs'} {named} {'is not a tensor' if one else 'are not tensors'}: "
            f"vault.open and vault.connect return {'it' if one else 'them'}, but the Open "
            f"Inference Protocol's REST and gRPC doors cannot carry {'it' if one else 'them'} "
            "(left out of their metadata). skl2onnx's classifiers give their probabilities "
            "as such a ZipMap unless converted with options={'zipmap': False}"
        )
    try:  # the graphs exactly as the worker will load them
        loads_here = check_loads(graphs, dict(files), seams, warnings)
        if batchable and not loads_here:
            raise SealError(
                "--batchable is checked by running the pipeline on this machine's CPU, where it "
                "does not load (see the warning): seal it here without --batchable, or with "
                "--batchable where onnxruntime runs it"
            )
        if batchable:
            check_rows(graphs, dict(files), inputs=inputs, outputs=outputs)
    except BaseException:
        for _, blob in files:
            _crypto.zeroize(blob)
        raise
    manifest: dict[str, Any] = {
        "format": f"vault-package/{FORMAT_VERSION}",
        "model_id": model_id,
        "key_id": "k-" + secrets.token_hex(16),
        "publisher": {"alg": "ed25519", "fingerprint": signing_key.fingerprint},
        "created": (now or _dt.datetime.now(_dt.timezone.utc))
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z"),
        "stages": [n for n, _ in stages],
        "composed": composed,
        "inputs": inputs,
        "outputs": outputs,
        "split_points": splits,
        "batchable": bool(batchable),
    }

    plaintext = build_plaintext(graphs, files)
    for _, blob in files:
        _crypto.zeroize(blob)
    pkey = bytearray(key) if key is not None else _crypto.generate_key()
    out = os.fspath(output)
    try:
        digest = write_package(
            out, manifest, plaintext, pkey, signing_key.sign,
            chunk_size=chunk_size, progress=progress,
        )  # fmt: skip
    except OSError as exc:
        raise VaultError(f"cannot write {out}: {exc}") from exc
    return SealResult(
        path=out,
        model_id=model_id,
        key_id=manifest["key_id"],
        key=pkey,
        digest=digest,
        manifest=manifest,
        warnings=warnings,
    )

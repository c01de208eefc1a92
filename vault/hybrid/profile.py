"""Per-node latency on this device, from onnxruntime's own profiler.

``vault profile MODEL.onnx -o device.json`` runs the model ``repeats`` times
(after a warm-up) with profiling on and records, per node, the median of its
kernel times. onnxruntime fuses nodes (a Conv and its activation, MatMul and
Add) and renames them (``conv5_nchwc``, ``matmul9/MatMulAddFusion``): a fused
kernel's time goes to the node whose name it carries, and the time of
kernels that belong to no node (layout reorders) is spread over all nodes in
proportion, so the per-node costs add up to the median of whole runs.

Example::

    costs = profile_model(onnx.load("model.onnx"), repeats=10, threads=1)
    costs["nodes"]["conv5"]   # milliseconds
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from ..core.errors import ConfigError
from ..core.ortthreads import apply_spin_policy
from ..core.ortvalues import run
from .cut import node_key

__all__ = ["PROFILE_FORMAT", "REAL_INPUTS_HINT", "example_inputs", "load_profile", "profile_model"]

PROFILE_FORMAT = "vault-profile/1"


# how to give real example inputs, for a model made-up ones do not run
REAL_INPUTS_HINT = (
    "give real example inputs: calibration=[{name: array, ...}] in Python (vault split), "
    "--calibration inputs.npz on the command line (NAME -> [K, ...] arrays, one row each)"
)


def example_inputs(model: onnx.ModelProto, *, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Random inputs for the model's graph inputs (symbolic dims -> ``batch``): any
    tensor dtype the wire carries (bfloat16, float8 and int4 through ml_dtypes;
    strings as short numerals). A model whose inputs are sequences or maps, or
    whose graph needs real shapes (a Reshape to a fixed size), needs real ones
    (:data:`REAL_INPUTS_HINT`)."""
    from ..core.graphs import onnx_type_name
    from ..core.protocol import dtype_from_name

    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, Any] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        kind = vi.type.WhichOneof("value")
        name = onnx_type_name(vi.type.tensor_type.elem_type) if kind == "tensor_type" else None
        if name is None:
            what = kind.removesuffix("_type") if kind and kind != "tensor_type" else (
                onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()
            )  # fmt: skip
            raise ConfigError(
                f"input {vi.name!r}: cannot make example data of type {what}; {REAL_INPUTS_HINT}"
            )
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = dtype_from_name(name)
        if name == "string":
            feeds[vi.name] = rng.integers(0, 100, shape).astype(str).astype(object)
        elif name in ("int4", "uint4"):
            feeds[vi.name] = rng.integers(0, 8, shape).astype(dtype)
        elif name.startswith(("float", "bfloat", "complex")):
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
        elif name == "bool":
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        else:  # integers
            high = 255 if name.startswith("uint") else 16
            feeds[vi.name] = rng.integers(0, high, shape).astype(dtype)
    return feeds


def session_options(threads: int | None) -> Any:
    """SessionOptions for a head run in the caller's process, and for its
    profile: the thread pools wait as the worker's do (spinning within a run,
    never long after it: an unbounded idle spinner made a 2-thread profile
    three times slower than the real worker on a busy machine, and steals
    the cores the tail's I/O needs; :mod:`vault.core.ortthreads`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    apply_spin_policy(so)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def _session(model_bytes: bytes, threads: int | None, prefix: str | None) -> Any:
    import onnxruntime as ort

    so = session_options(threads)
    if prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = prefix
    try:
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types, in the vault's words
        why = " ".join(str(exc).split())[:300]
        raise ConfigError(f"onnxruntime cannot load the model to profile it: {why}") from exc


def _kernel_node(name: str, known: set[str], producers: Mapping[str, str]) -> str | None:
    """The node a profiler event's kernel is named after: a node's name, or,
    where onnxruntime fused nodes into one kernel (a Conv with its Relu in
    the NCHWc layout), the group's output tensor (``block1_out_nchwc``),
    whose producer is then the node."""
    base = name[: -len("_kernel_time")]
    head = base.split("/", 1)[0]
    cands = (base, head, base.removesuffix("_nchwc"), head.removesuffix("_nchwc"))
    for cand in cands:
        if cand in known:
            return cand
    for cand in cands:
        if cand in producers:
            return producers[cand]
    return None


def _group_head(last: str, op: str, nodes: Mapping[str, onnx.NodeProto],
                producers: Mapping[str, str], consumers: Mapping[str, int]) -> str:  # fmt: skip
    """Where onnxruntime fused nodes into one kernel, the kernel is named
    after the group's last node or output (a Conv and its Clip run as
    ``clip6_nchwc``) and reports the op it runs (``Conv``): the node of that
    op, found back from ``last`` through predecessors that each feed only the
    next one; ``last`` itself when none is. So the Conv, whose cost it mostly
    is, carries it, and a cut between the two prices it in the head."""
    key, seen = last, {last}
    while nodes[key].op_type != op:
        fed = [producers[t] for t in nodes[key].input if t in producers]
        if len(fed) != 1 or fed[0] in seen:
            return last
        if any(consumers.get(o, 0) != 1 for o in nodes[fed[0]].output if o):
            return last
        key = fed[0]
        seen.add(key)
    return key


def profile_model(
    model: onnx.ModelProto,
    *,
    repeats: int = 10,
    threads: int | None = None,
    feeds: Mapping[str, Any] | None = None,
    hint: str = REAL_INPUTS_HINT,
) -> dict[str, Any]:
    """Per-node median latencies (ms) of ``model`` on this CPU; see the module docstring.

    ``feeds``: one input to run it on (default: :func:`example_inputs`, made up);
    a model that does not run on them is a :class:`ConfigError` that says so,
    ending with ``hint`` (how to give real ones)."""
    if repeats < 1:
        raise ConfigError("repeats must be at least 1")
    with _nodes_named(model):
        return _profile(model, repeats, threads, feeds, hint)


@contextlib.contextmanager
def _nodes_named(model: onnx.ModelProto) -> Iterator[None]:
    """Each unnamed node (onnx.helper's default) named as its cost is recorded
    (``#index``) while profiled, and unnamed again after: onnxruntime's events
    name nodes, and every unnamed one's time went to none (a model at 0 ms)."""
    unnamed = [n for n in model.graph.node if not n.name]
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = node_key(n, i)
    try:
        yield
    finally:
        for n in unnamed:
            n.name = ""


def _profile(
    model: onnx.ModelProto,
    repeats: int,
    threads: int | None,
    feeds: Mapping[str, Any] | None,
    hint: str,
) -> dict[str, Any]:
    data = model.SerializeToString()
    inputs = dict(feeds) if feeds is not None else example_inputs(model)
    # whole runs, without the profiler's own overhead
    plain = _session(data, threads, None)
    try:
        run(plain, inputs)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: said in the vault's words
        raise cannot_run(exc, made_up=feeds is None, hint=hint) from exc
    run(plain, inputs)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(plain, inputs)
        walls.append((time.perf_counter() - t0) * 1e3)
    del plain
    tmp = tempfile.mkdtemp(prefix="vault-profile-")
    try:
        sess = _session(data, threads, os.path.join(tmp, "p"))
        run(sess, inputs)  # warm-up: its events are dropped below
        for _ in range(repeats):
            run(sess, inputs)
        path = sess.end_profiling()
        with open(path, encoding="utf-8") as fh:
            events = json.load(fh)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = [node_key(n, i) for i, n in enumerate(model.graph.node)]
    return _per_node(model, keys, events, walls, repeats, threads)


def _per_node(
    model: onnx.ModelProto,
    keys: list[str],
    events: list[dict[str, Any]],
    walls: list[float],
    repeats: int,
    threads: int | None,
) -> dict[str, Any]:
    """Each node's share of the runs in onnxruntime's profile ``events``."""
    known = set(keys)
    producers = {out: key for key, n in zip(keys, model.graph.node) for out in n.output if out}
    nodes = dict(zip(keys, model.graph.node))
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers[t] = consumers.get(t, 0) + 1
    owner: dict[str, str | None] = {}  # a kernel's name -> the node its time is put on
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or name in owner:
            continue
        key = _kernel_node(name, known, producers)
        op = (e.get("args") or {}).get("op_name")
        if key is not None and isinstance(op, str):
            key = _group_head(key, op, nodes, producers, consumers)
        owner[name] = key
    runs: list[dict[str, float]] = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append({})
        elif e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and runs:
            k = owner.get(str(e["name"])) or "(other)"
            runs[-1][k] = runs[-1].get(k, 0.0) + float(e.get("dur", 0)) / 1e3
    runs = runs[1:] if len(runs) > repeats else runs  # the warm-up run
    per_node = {k: statistics.median([r.get(k, 0.0) for r in runs]) for k in keys}
    other = statistics.median([r.get("(other)", 0.0) for r in runs]) if runs else 0.0
    wall = statistics.median(walls)
    matched = sum(per_node.values())
    scale = wall / matched if matched > 0 else 1.0
    return {
        "format": PROFILE_FORMAT,
        "device": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads},
        "repeats": repeats,
        "run_ms": round(wall, 4),
        "kernel_ms": round(matched + other, 4),
        "nodes": {k: round(v * scale, 5) for k, v in per_node.items()},
    }


def cannot_run(
    exc: BaseException, *, made_up: bool, hint: str, given: str = "the example input given"
) -> ConfigError:
    """The vault's words for a model that failed on the inputs it was run
    with: made-up ones (then how to give real ones), or ``given``."""
    if isinstance(exc, ConfigError):
        return exc
    why = " ".join(str(exc).split())[:300]
    if made_up:
        return ConfigError(
            "the model does not run on made-up inputs (each symbolic dimension 1, random "
            f"values): {why}; it needs real example inputs: {hint}"
        )
    return ConfigError(f"the model does not run on {given}: {why}")


def load_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: cannot read a profile ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ConfigError(
            f"{p}: not a vault profile ({PROFILE_FORMAT}); make one with vault profile"
        )
    return data

"""``vault split``: cut a model into a head for the caller and a sealed tail.

What :func:`split` writes into ``output_dir`` for each shipped cut ``cK``:

- ``head-cK.onnx`` (plain ONNX; the caller runs it in-process) or, with
  ``seal_head``, ``head-cK.vault`` (model id ``ID.head``, for a local worker);
  no head at all for the all-server cut;
- ``tail-cK.vault``, sealed (model id ``ID.tail`` for the first cut,
  ``ID.tail.cK`` for the others); its key goes to ``register`` and is then
  overwritten, never written anywhere;
- ``split.json``, the public description: the model's signature, which
  tensors cross each cut (names, dtypes, shapes, wire encoding), which tail
  serves which head, and each cut's measured costs (the server's profile of
  the tail, not its graph).

Steps: load and check the stages (as :func:`vault.sealing.seal` does: no
external-data path outside the model's folder, no custom ops), compose
pre → model → post into one graph, validate each cut against the vendor's
policy (:mod:`vault.hybrid.cut`), profile, plan (``link``), choose wire
encodings and check their accuracy on calibration inputs, then seal. The
tail's weights only ever exist in memory and in the sealed package.

Example::

    res = split("model.onnx", model_id="clf", signing_key=pk, output_dir="clf.split",
                at=[["h2"]], split_points=["h2"], register=register_with_keyserver)
    res.description["cuts"][0]["crossing"]   # [{"name": "h2", ...}]
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .. import sealing as _sealing
from ..core import crypto as _crypto
from ..core.errors import ConfigError, SealError, VaultError
from ..core.files import write_private_file
from ..core.graphs import known_dims, onnx_type_name, shape_text
from ..core.ortvalues import run as _ort_run
from ..core.protocol import ORTVALUE_DTYPES
from .cut import Cut, CutGraph, Policy, node_key
from .plan import CutCost, Link, format_table, plan
from .profile import REAL_INPUTS_HINT, cannot_run, example_inputs, profile_model

__all__ = ["SPLIT_FORMAT", "SplitResult", "split", "split_graphs"]

SPLIT_FORMAT = "vault-split/1"
ENCODINGS = ("float32", "float16", "int8")
ALL_SERVER = "(inputs)"  # --at (inputs): the all-server cut
_ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}


@dataclass
class SplitResult:
    directory: str
    description: dict[str, Any]
    table: str | None  # the planner's table, when it chose


# --- loading -----------------------------------------------------------------------------------


def _load_pipeline(
    model: _sealing.ModelLike,
    pre: _sealing.ModelLike | None,
    post: _sealing.ModelLike | None,
    io_map: Mapping[str, Mapping[str, str]] | None,
) -> tuple[onnx.ModelProto, list[str]]:
    """One graph from pre → model → post (names inside stages get a prefix)."""
    stages: list[tuple[str, onnx.ModelProto]] = []
    if pre is not None:
        stages.append(("pre", _sealing._load_stage(pre, "pre")))
    stages.append(("model", _sealing._load_stage(model, "model")))
    if post is not None:
        stages.append(("post", _sealing._load_stage(post, "post")))
    for name, m in stages:
        _sealing._check_stage(m, name)
    io_map = io_map or {}
    links = [
        _sealing._wire(um, dm, un, dn, io_map.get(un if un != "model" else dn))
        for (un, um), (dn, dm) in zip(stages, stages[1:])
    ]
    try:
        merged = _sealing._compose(stages, links)
    except ValueError as exc:
        raise SealError(f"cannot compose the stages into one graph to cut: {exc}") from exc
    return _produce_constant_outputs(merged), [n for n, _ in stages]


_INT8_NEEDS_CALIBRATION = (  # said once, before any run
    "int8 on the wire needs real calibration inputs (calibration=..., vault split "
    "--calibration INPUTS.npz; a few hundred rows): its scale is the largest value "
    "they give, and made-up inputs neither bound real ones nor measure the error"
)


def _produce_constant_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph output that is an initializer (onnxruntime runs such a model)
    gets a node producing it: the initializer renamed (its readers, sub-graphs'
    included, read it under the new name) and an ``Identity`` last in the
    graph giving the output's name, so no other node's index moves (an
    unnamed node's cost is keyed by it). Before, the cut's walk back from the
    outputs found no producer: a bare KeyError. ``model`` itself is left as
    it is (a copy is changed)."""
    inputs = {i.name for i in model.graph.input}
    names = {t.name for t in model.graph.initializer}
    if not any(o.name in names and o.name not in inputs for o in model.graph.output):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    taken = inits.keys() | {o for n in m.graph.node for o in n.output} | inputs
    for o in m.graph.output:
        if o.name not in inits or o.name in inputs:  # an input's own check says so
            continue
        new = f"{o.name}__const"
        while new in taken:
            new += "_"
        taken.add(new)
        inits[o.name].name = new
        _rename_reads(m.graph, o.name, new)
        m.graph.node.append(onnx.helper.make_node("Identity", [new], [o.name],
                                                  name=f"{o.name}__const_out"))  # fmt: skip
    return m


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node of ``graph`` and of its sub-graphs reads ``new`` where it read
    ``old`` (a sub-graph that defines ``old`` itself keeps its own)."""
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        for attr in node.attribute:
            subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subs:
                own = (
                    {i.name for i in sub.input}
                    | {t.name for t in sub.initializer}
                    | {o for n in sub.node for o in n.output}
                )
                if old not in own:
                    _rename_reads(sub, old, new)


def _align_profile(
    nodes: Mapping[str, float],
    g: CutGraph,
    stages: list[str],
    log: Callable[[str], None],
    what: str = "client",
) -> dict[str, float]:
    """A profile keyed as the graph being cut. One made of the model alone
    (``vault profile model.onnx``) keys its nodes as in model.onnx: a named
    node by its name, which the composed pipeline prefixes (``mm1`` is
    ``model/mm1``), an unnamed one (onnx.helper's default) by its index
    there (``#3``), which composing moves (the pre stage's nodes and the
    wiring come first). The model's nodes keep their order in the composed
    graph, so each is found back by its name or its rank among them. Before,
    an unnamed node's index was taken as the composed graph's, or dropped:
    a client profile of an unnamed model priced nothing ("names none of this
    graph's nodes") and the planner chose as if the client were free.

    A profile of the composed pipeline itself (``profile_model`` of it: its
    keys name the wiring, ``in/...``) is taken as it is."""
    keys = [node_key(n, i) for i, n in enumerate(g.nodes)]
    if len(stages) == 1 or any(k.startswith(("in/", "link/")) for k in nodes):
        out = {k: float(nodes[k]) for k in keys if k in nodes}
    else:
        out = {}
        for rank, (i, n) in enumerate(
            (i, n) for i, n in enumerate(g.nodes) if _in_stage(n, "model")
        ):
            alone = n.name[len("model/") :] if n.name else f"#{rank}"
            if alone in nodes:
                out[keys[i]] = float(nodes[alone])
    if nodes and not out:
        log(f"warning: the {what} profile names none of this graph's nodes (profile the same "
            f"model you split); the {what}'s costs are taken as zero")  # fmt: skip
    return out


def _in_stage(node: onnx.NodeProto, stage: str) -> bool:
    """Whether a node of the composed pipeline is one of ``stage``'s own: its
    name carries the stage's prefix, or, unnamed, every output does (the
    wiring's Identity nodes are named ``in/``, ``link/``, ``out/``)."""
    p = f"{stage}/"
    if node.name:
        return node.name.startswith(p)
    outs = [o for o in node.output if o]
    return bool(outs) and all(o.startswith(p) for o in outs)


def _resolver(g: CutGraph, stages: list[str]) -> Callable[[str], str]:
    def resolve(name: str) -> str:
        if g.known_tensor(name) or len(stages) == 1:
            return name
        for s in ("model", *stages):
            if g.known_tensor(f"{s}/{name}"):
                return f"{s}/{name}"
        return name

    return resolve


def split_graphs(
    model: onnx.ModelProto, at: Sequence[str], *, policy: Policy
) -> tuple[onnx.ModelProto, onnx.ModelProto, Cut]:
    """The plain head and tail models of one cut (no sealing, no encoding)."""
    g = CutGraph(model)
    cut = g.cut(list(at), policy=policy)
    return g.head_model(cut), g.tail_model(cut), cut


# Lists every cut a model has, for a vendor who has not named one yet: every
# single tensor is allowed here (a protected region naming no tensor).
_EVERY_CUT = Policy(protect_from=frozenset({"\0(every cut: listing only)"}))


@dataclass
class CutOptions:
    """The cuts :func:`split` could make: ``cuts`` (valid under ``policy``, or under
    no restriction when the vendor declared none: ``policy_declared`` False) and
    ``skipped``, the tensors that would separate the model but whose type no
    shape inference knows."""

    graph: CutGraph
    cuts: list[Cut]
    skipped: list[str]
    policy_declared: bool

    def names(self) -> list[str]:
        return [c.name for c in self.cuts]

    def table(self) -> str:
        g = self.graph
        head = "cuts this model allows" if self.policy_declared else (
            "cuts this model has (declare which may leave the server: --split-point T "
            "or --protect-from T)"
        )  # fmt: skip
        lines = [f"{head}:", f"  {'tensor':<32} {'dtype':<8} {'shape':<20} "
                 f"{'bytes/row':>9} {'head nodes':>10}  crossing"]  # fmt: skip
        for c in self.cuts:
            t = c.tensors[0]
            d = _sealing._describe(g.value_info(t))
            up = sum(_nbytes(g, x) for x in c.crossing)
            extra = ", ".join(x for x in c.crossing if x != t)
            lines.append(
                f"  {t:<32} {d['dtype']:<8} {shape_text(d['shape']):<20} {up:>9} "
                f"{len(c.head_nodes):>10}  {t + (' + ' + extra if extra else '')}"
            )
        if not self.cuts:
            lines.append("  (none)")
        if self.skipped:
            lines.append(
                f"  not listed: {', '.join(self.skipped)} (no tensor type known; a cut "
                "there needs value_info)"
            )
        return "\n".join(lines)


def _options(g: CutGraph, policy: Policy) -> CutOptions:
    skipped: list[str] = []
    declared = policy.allows_anything
    cuts = g.candidates(policy if declared else _EVERY_CUT, skipped=skipped)
    return CutOptions(g, cuts, skipped, declared)


def cut_options(
    model: _sealing.ModelLike,
    *,
    split_points: Iterable[str] = (),
    protect_from: Iterable[str] = (),
    pre: _sealing.ModelLike | None = None,
    post: _sealing.ModelLike | None = None,
    io_map: Mapping[str, Mapping[str, str]] | None = None,
) -> CutOptions:
    """Every single-tensor cut of the (composed) pipeline, under the vendor's policy
    when one is given (what ``vault split`` without ``--at``/``--auto`` prints)."""
    merged, stages = _load_pipeline(model, pre, post, io_map)
    g = CutGraph(merged)
    if not _sealing._too_big(merged):
        _observe_shapes(g, None)
    return _options(g, _policy(g, stages, split_points, protect_from))


def _policy(
    g: CutGraph, stages: list[str], split_points: Iterable[str], protect_from: Iterable[str]
) -> Policy:
    resolve = _resolver(g, stages)
    policy = Policy(
        split_points=frozenset(resolve(t) for t in split_points),
        protect_from=frozenset(resolve(t) for t in protect_from),
    )
    for t in (*policy.split_points, *policy.protect_from):
        if not g.known_tensor(t):
            raise SealError(f"policy names {t!r}, which is not a tensor of the top-level graph")
    return policy


def _short_list(names: Sequence[str], limit: int = 12) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


# --- costs ---------------------------------------------------------------------------------------


def _nbytes(g: CutGraph, name: str, itemsize: int | None = None) -> int:
    """Bytes of one row of ``name`` (the first dim counts as 1, as do other
    symbolic ones no run observed: :func:`_observe_shapes`); 0 for what has no
    tensor type (a ZipMap's sequence of maps): the same for every cut."""
    if not g.typed(name):
        return 0
    vi = g.value_info(name)
    tt = vi.type.tensor_type
    seen = g.observed.get(name)
    n = 1
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            n *= d.dim_value
        elif i and seen is not None and len(seen) == len(tt.shape.dim) and seen[i] > 0:
            n *= seen[i]  # an inner dim inference left unknown: as one run had it
    if itemsize is None:
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except Exception:  # noqa: BLE001 - strings: counted as nothing
            itemsize = 0
    return n * itemsize


def _observe_shapes(g: CutGraph, feeds: Mapping[str, Any] | None) -> None:
    """Run the model once on ``feeds`` (default: made-up ones) and record the shape of each
    tensor whose inner dims inference left unknown (skl2onnx's [N, ?]
    scaled features read as 4 bytes a row where they were 4,000: the
    planner shipped them on a 0.1 Mbit/s link). Nothing recorded if the run
    fails: those dims count as 1, as before."""
    names = []
    for i, n in enumerate(g.nodes):
        if not g.dynamic[i]:
            continue
        for o in n.output:
            if o and g.typed(o):
                dims = g.value_info(o).type.tensor_type.shape.dim
                if any(not d.HasField("dim_value") for d in list(dims)[1:]):
                    names.append(o)
    if not names:
        return
    try:
        if feeds is None:
            feeds = example_inputs(g.model)
        got = _ort_run(_session(_with_outputs(g, names)), feeds, names)
    except Exception:  # noqa: BLE001 - a model that needs other inputs: nothing learnt
        return
    for name in names:
        shape = getattr(got.get(name), "shape", None)
        if shape is not None:
            g.observed[name] = tuple(int(d) for d in shape)


def _cost(
    g: CutGraph,
    cut: Cut,
    client: Mapping[str, float],
    server: Mapping[str, float],
    encoding: Mapping[str, str] | None = None,
) -> CutCost:
    keys = [node_key(n, i) for i, n in enumerate(g.nodes)]
    enc = encoding or {}
    up = 0
    for t in cut.crossing:
        e = enc.get(t, "float32")
        float_t = g.elem_type(t) == onnx.TensorProto.FLOAT
        up += _nbytes(g, t, _ITEMSIZE[e] if float_t else None)
    down = sum(_nbytes(g, o) for o in g.outputs)
    return CutCost(
        cut=cut.name,
        head_ms=sum(float(client.get(keys[i], 0.0)) for i in cut.head_nodes),
        tail_ms=sum(float(server.get(keys[i], 0.0)) for i in cut.tail_nodes),
        bytes_up=up,
        bytes_down=down,
    )


# --- accuracy of a wire encoding -----------------------------------------------------------------------


def _session(m: onnx.ModelProto, what: str = "the model") -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types, in the vault's words
        why = " ".join(str(exc).split())[:300]
        raise SealError(f"onnxruntime cannot load {what}: {why}") from exc


def _with_outputs(g: CutGraph, names: Iterable[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(g.model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(g.value_info(n) for n in names if n not in have)
    return m


def _run_split(head: Any, tail: Any, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """Head then tail on one input, as the caller and the tail worker run them
    (bfloat16, float8 and int4 cut tensors cross as ml_dtypes arrays)."""
    mid = dict(feeds) if head is None else _ort_run(head, feeds)
    names = [i.name for i in tail.get_inputs()]
    return _ort_run(tail, {n: mid[n] for n in names})


def _compare(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest absolute output error, and each classifier-like output's
    top-1 agreement over every row of every calibration input (the worst
    output's): pooled, not the worst input's (a file of 200 one-row inputs
    with one row flipped read 0.0, not 0.995)."""
    err = 0.0
    hits: dict[str, list[int]] = {}  # output -> [rows that agree, rows]
    for r, o in zip(ref, got):
        for k, v in r.items():
            a, b = _numeric(v), _numeric(o[k])
            if a.dtype.kind in "fc" and a.size:
                with np.errstate(invalid="ignore", over="ignore"):
                    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                same_nan = np.isnan(a) & np.isnan(b)
                err = max(
                    err, float(np.max(np.where(same_nan, 0.0, np.nan_to_num(diff, nan=np.inf))))
                )
                if a.ndim >= 2 and a.shape[-1] > 1:
                    same = a.argmax(-1) == b.argmax(-1)
                    h = hits.setdefault(k, [0, 0])
                    h[0] += int(same.sum())
                    h[1] += int(same.size)
            elif not np.array_equal(a, b):
                err = max(err, float("inf") if a.dtype.kind not in "iub" else 1.0)
    agree = [n_same / n for n_same, n in hits.values() if n]
    return {"max_abs_error": err, "top1_agreement": min(agree) if agree else None}


def _numeric(v: Any) -> Any:
    """An output as an array: a ZipMap's sequence of {class: score} maps becomes
    rows of scores (class order), so an encoding's error on them is measured."""
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        return np.asarray([[x[c] for c in sorted(x)] for x in v], dtype=np.float64)
    return np.asarray(v)


def _calibrate(
    g: CutGraph, cut: Cut, encoding: str, calibration: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Wire settings for ``cut`` under ``encoding`` (int8: per-tensor scale from the data)."""
    floats = [t for t in cut.crossing if g.elem_type(t) == onnx.TensorProto.FLOAT]
    if encoding == "float32" or not floats or cut.all_server:
        return {}
    if encoding == "float16":
        return {t: {"encoding": "float16"} for t in floats}
    sess = _session(_with_outputs(g, floats))
    peak = dict.fromkeys(floats, 0.0)
    for feeds in calibration:
        outs = _ort_run(sess, feeds, floats)
        for t in floats:
            peak[t] = max(peak[t], float(np.max(np.abs(outs[t]))) if outs[t].size else 0.0)
    return {t: {"encoding": "int8", "scale": (peak[t] / 127.0) or 1.0} for t in floats}


# --- split ----------------------------------------------------------------------------------------


def split(
    model: _sealing.ModelLike,
    *,
    model_id: str,
    signing_key: _crypto.PublisherKey,
    output_dir: str | os.PathLike[str],
    at: Sequence[Sequence[str]] = (),
    link: Link | None = None,
    split_points: Iterable[str] = (),
    protect_from: Iterable[str] = (),
    pre: _sealing.ModelLike | None = None,
    post: _sealing.ModelLike | None = None,
    io_map: Mapping[str, Mapping[str, str]] | None = None,
    seal_head: bool = False,
    encoding: str = "float32",
    max_error: float = 0.05,
    min_agreement: float = 0.99,
    calibration: Sequence[Mapping[str, Any]] | None = None,
    client_costs: Mapping[str, Any] | None = None,
    server_costs: Mapping[str, Any] | None = None,
    alternatives: int = 0,
    register: Callable[[_sealing.SealResult], None] | None = None,
    server_key: str | None = None,
    profile_repeats: int = 5,
    log: Callable[[str], None] = lambda _msg: None,
    now: _dt.datetime | None = None,
    batchable: bool = False,
) -> SplitResult:
    """Cut ``model`` at each cut in ``at`` (or the planner's choice for ``link``).

    ``batchable``: each tail is sealed with the declaration (checked on the
    tail itself, as :func:`vault.seal` checks it) so the service may join
    callers' tail calls; the head runs for one caller and is never batched."""
    if bool(at) and link is not None:
        raise ConfigError(
            "name the cut (at=[[TENSOR, ...]]) or ask the planner (link=...), not both"
        )
    if encoding not in ENCODINGS:
        raise ConfigError(f"encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    if link is not None and not (
        math.isfinite(link.rtt_ms) and link.rtt_ms >= 0 and math.isfinite(link.mbit)
        and link.mbit > 0
    ):  # fmt: skip
        raise ConfigError(f"the link to plan for: a round trip of {link.rtt_ms} ms and "
                          f"{link.mbit} Mbit/s; give a finite RTT >= 0 and a finite "
                          "bandwidth > 0")  # fmt: skip
    if alternatives < 0 or (alternatives and link is None):
        raise ConfigError("alternatives: a number of further cuts >= 0, and only when the "
                          "planner chooses (link=..., vault split --auto)")  # fmt: skip
    for tensors in at:
        twice = sorted({t for t in tensors if list(tensors).count(t) > 1})
        if twice:
            raise ConfigError(f"cut at {list(tensors)}: {twice[0]!r} is named twice")
    if not (0 <= min_agreement <= 1) or not (max_error >= 0):
        raise ConfigError("max_error must be >= 0 and min_agreement between 0 and 1")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,100}$", model_id):
        raise SealError(f"model id {model_id!r}: use 1-100 letters, digits, '.', '_', ':' or '-'")
    merged, stages = _load_pipeline(model, pre, post, io_map)
    big = _sealing._too_big(merged)
    if calibration is None and encoding == "int8" and not big:
        # its scale is the largest value the calibration inputs give: made-up
        # ones bound nothing real (a split accepted at 0.0068 was off by 0.48 on
        # fresh inputs of the very distribution it made up)
        raise ConfigError(_INT8_NEEDS_CALIBRATION)
    g = CutGraph(merged)
    resolve = _resolver(g, stages)
    policy = _policy(g, stages, split_points, protect_from)
    if not at and link is None:
        opts = _options(g, policy)
        raise ConfigError(
            "name the cut (--at TENSOR) or ask the planner (--auto); the cuts this model "
            f"{'allows' if opts.policy_declared else 'has'}: {_short_list(opts.names())}"
        )
    if not policy.allows_anything:
        opts = _options(g, policy)
        raise SealError(
            "the vendor allows nothing to leave the server: declare the tensors a cut may "
            "be made at (--split-point TENSOR) or a protected region (--protect-from TENSOR); "
            f"the cuts this model has: {_short_list(opts.names())}"
        )
    if big and encoding != "float32":
        raise SealError("a model past 2 GiB cannot be checked for a wire encoding; use float32")
    # the cuts named are checked before anything runs (a cut tensor the wire cannot
    # carry is refused naming it, not met as onnxruntime's error in the profile)
    # "(inputs)", the name the planner's table gives it: ship the all-server cut
    # too (no head, the tail is the whole model), for clients that re-plan
    named = [
        g.all_server()
        if list(tensors) == [ALL_SERVER]
        else g.cut([resolve(t) for t in tensors], policy=policy)
        for tensors in at
    ]

    # costs: the server's from here (or a file), the client's from its own profile
    if big:
        server_nodes: Mapping[str, float] = (server_costs or {}).get("nodes", {})
    else:
        if server_costs is None:
            # on the first calibration input when there is one: a model whose graph needs
            # real shapes (an exporter's Reshape to the sequence length) fails on made-up ones
            log("profiling the model on this machine (the server side)")
            server_costs = profile_model(merged, repeats=profile_repeats,
                                         feeds=calibration[0] if calibration else None)  # fmt: skip
        server_nodes = server_costs["nodes"]
    if server_costs is not None and server_nodes:  # a file too may be of the model alone
        server_nodes = _align_profile(server_nodes, g, stages, log, "server")
    client_nodes = (client_costs or {}).get("nodes", server_nodes)
    if link is not None and client_costs is None:
        log("no client profile: assuming the caller's device is as fast as this one")
    elif client_costs is not None:
        client_nodes = _align_profile(client_nodes, g, stages, log)

    if not big:  # what a row of each cut tensor weighs, where inference cannot say
        _observe_shapes(g, calibration[0] if calibration else None)
    table = None
    if link is not None:
        skipped: list[str] = []
        cuts = g.candidates(policy, skipped=skipped)
        if skipped:
            log(f"left out of the plan (no tensor type known): {_short_list(skipped)}")
        options = [g.all_server(), *cuts]
        enc = {t: encoding for c in cuts for t in c.crossing}
        costs = {c.name: _cost(g, c, client_nodes, server_nodes, enc) for c in options}
        rows = plan(list(costs.values()), link)
        table = format_table(rows, link)
        by_name = {c.name: c for c in options}
        chosen = [by_name[r.cut] for r in rows[: 1 + max(0, alternatives)]]
    else:
        chosen = named

    made_up = calibration is None
    if calibration is None and not big:
        calibration = [example_inputs(merged, seed=s) for s in range(8)]
        if encoding != "float32":
            log(f"the {encoding} check runs on 8 made-up inputs: give real ones "
                "(--calibration) for a check that says something about your data")  # fmt: skip
    reference: list[dict[str, Any]] = []
    if not big:
        whole = _session(merged)
        for k, f in enumerate(calibration or []):
            try:
                reference.append(_ort_run(whole, f))
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own types
                raise cannot_run(exc, made_up=made_up, hint=REAL_INPUTS_HINT,
                                 given=f"calibration input {k}") from exc  # fmt: skip

    out = os.fspath(output_dir)
    with _StagedDirectory(out) as stage:
        desc = _write_split(
            g, chosen, stage.path, model_id=model_id, signing_key=signing_key, stages=stages,
            policy=policy, seal_head=seal_head, encoding=encoding, calibration=calibration or [],
            reference=reference, max_error=max_error, min_agreement=min_agreement,
            client_nodes=client_nodes, server_nodes=server_nodes, register=register, big=big,
            log=log, link=link, server_key=server_key, now=now, batchable=batchable,
            made_up=made_up,
        )  # fmt: skip
    return SplitResult(out, desc, table)


def _write_split(
    g: CutGraph,
    chosen: Sequence[Cut],
    out: str,
    *,
    model_id: str,
    signing_key: _crypto.PublisherKey,
    stages: list[str],
    policy: Policy,
    seal_head: bool,
    encoding: str,
    calibration: Sequence[Mapping[str, Any]],
    reference: list[dict[str, Any]],
    max_error: float,
    min_agreement: float,
    client_nodes: Mapping[str, float],
    server_nodes: Mapping[str, float],
    register: Callable[[_sealing.SealResult], None] | None,
    big: bool,
    log: Callable[[str], None],
    link: Link | None,
    server_key: str | None,
    now: _dt.datetime | None,
    batchable: bool,
    made_up: bool = False,
) -> dict[str, Any]:
    merged = g.model
    entries = []
    for k, cut in enumerate(chosen):
        entries.append(
            _write_cut(
                g, cut, k, out=out, model_id=model_id, signing_key=signing_key,
                seal_head=seal_head, encoding=encoding, calibration=calibration,
                reference=reference, max_error=max_error, min_agreement=min_agreement,
                cost=_cost(g, cut, client_nodes, server_nodes, dict.fromkeys(cut.crossing, encoding)),
                register=register, big=big, log=log, batchable=batchable, made_up=made_up,
            )
        )  # fmt: skip
    desc: dict[str, Any] = {
        "format": SPLIT_FORMAT,
        "model_id": model_id,
        "created": (now or _dt.datetime.now(_dt.timezone.utc))
        .replace(microsecond=0)
        .isoformat()
        .replace("+00:00", "Z"),
        "stages": stages,
        "inputs": [_sealing._describe(vi) for vi in merged.graph.input if vi.name in g.inputs],
        "outputs": [_sealing._describe(vi) for vi in merged.graph.output],
        "policy": {
            "split_points": sorted(policy.split_points),
            "protect_from": sorted(policy.protect_from),
        },
        "cuts": entries,
        "default": entries[0]["name"],
    }
    if link is not None:
        desc["planned_for"] = {"rtt_ms": link.rtt_ms, "mbit": link.mbit}
    if server_key:
        desc["server_key"] = server_key
    data = (json.dumps(desc, indent=2, sort_keys=True) + "\n").encode()
    with open(os.path.join(out, "split.json"), "wb") as fh:
        fh.write(data)
    return desc


# the names a split writes (split.json and, per cut cK, its head and tail)
_SPLIT_FILE = re.compile(r"(split\.json|head-c\d+\.(onnx|onnx\.data|vault)|tail-c\d+\.vault)")


def _not_split_files(directory: str) -> list[str]:
    """Entries of ``directory`` that no split writes: anything but a regular
    file named as a split names its files (a link or a folder of that name included)."""
    others = []
    for entry in sorted(os.listdir(directory)):
        st = os.lstat(os.path.join(directory, entry))
        if not (_SPLIT_FILE.fullmatch(entry) and stat.S_ISREG(st.st_mode)):
            others.append(entry)
    return others


class _StagedDirectory:
    """The split is written into a fresh directory beside ``target`` and renamed
    into place only when every file is written: a failure leaves nothing behind
    (no half split, no empty directory). An existing ``target`` must be empty or
    hold an earlier split and nothing else: that split's files are replaced;
    a directory holding anything a split did not write is refused untouched,
    with those entries named (checked again as it is swapped)."""

    def __init__(self, target: str) -> None:
        self.target = os.path.abspath(target)
        if os.path.lexists(self.target):
            if not os.path.isdir(self.target) or os.path.islink(self.target):
                raise ConfigError(f"{target}: exists and is not a directory")
            entries = os.listdir(self.target)
            if entries and "split.json" not in entries:
                raise ConfigError(
                    f"{target}: a non-empty directory that holds no split; choose a new path"
                )
            self._refuse_others(self.target, target)
        parent = os.path.dirname(self.target)
        if not os.path.isdir(parent):
            raise ConfigError(f"{target}: its folder {parent} does not exist")
        import tempfile

        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.", dir=parent)
        os.chmod(self.path, 0o755)  # what os.makedirs made before: the split is public

    @staticmethod
    def _refuse_others(directory: str, shown: str) -> None:
        others = _not_split_files(directory)
        if others:
            raise ConfigError(
                f"{shown}: holds an earlier split and {_short_list(others)}, which no split "
                "wrote; a split replaces only its own files: move those away or choose a new path"
            )

    def __enter__(self) -> _StagedDirectory:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        import shutil

        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        old = None
        if os.path.lexists(self.target):
            old = self.path + ".old"
            os.rename(self.target, old)
        try:
            if old is not None:  # something added since the check stays where it was
                self._refuse_others(old, self.target)
            os.rename(self.path, self.target)
        except BaseException:
            if old is not None:
                os.rename(old, self.target)
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        if old is not None:  # only the earlier split's own files are deleted
            for entry in os.listdir(old):
                if _SPLIT_FILE.fullmatch(entry):
                    os.unlink(os.path.join(old, entry))
            try:
                os.rmdir(old)
            except OSError:  # written into during the swap: kept, beside the split
                pass


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _write_cut(
    g: CutGraph,
    cut: Cut,
    k: int,
    *,
    out: str,
    model_id: str,
    signing_key: _crypto.PublisherKey,
    seal_head: bool,
    encoding: str,
    calibration: Sequence[Mapping[str, Any]],
    reference: list[dict[str, Any]],
    max_error: float,
    min_agreement: float,
    cost: CutCost,
    register: Callable[[_sealing.SealResult], None] | None,
    big: bool,
    log: Callable[[str], None],
    batchable: bool = False,
    made_up: bool = False,
) -> dict[str, Any]:
    name = f"c{k}"
    wire = {} if big else _calibrate(g, cut, encoding, calibration)
    head = None if cut.all_server else g.head_model(cut, wire)
    tail = g.tail_model(cut, wire)
    if head is not None:
        _check_head_can_hand_over(g, cut, head)
    if head is not None and not big:
        # the head is checked as vault seal checks what it seals (one policy)
        _sealing.check_well_formed(head, f"cut {cut.name}: the head")
    accuracy: dict[str, Any] = {"checked": False, "why": "model past 2 GiB"}
    if not big:
        hs = _session(head, f"cut {cut.name}: the head") if head is not None else None
        ts = _session(tail, f"cut {cut.name}: the tail")
        try:
            got = [_run_split(hs, ts, f) for f in calibration]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types
            why = exc if isinstance(exc, VaultError) else " ".join(str(exc).split())[:300]
            raise SealError(
                f"cut {cut.name}: head then tail fail on a calibration input the whole model "
                f"runs: {why}"
            ) from exc
        accuracy = {"checked": True, "inputs": len(calibration), "made_up_inputs": made_up,
                    **_compare(reference, got)}  # fmt: skip
        agree = accuracy["top1_agreement"]
        if encoding != "float32" and (
            accuracy["max_abs_error"] > max_error or (agree is not None and agree < min_agreement)
        ):
            raise SealError(
                f"cut {cut.name}: {encoding} on the wire is off by up to "
                f"{accuracy['max_abs_error']:.4g} (top-1 agreement {agree}) on "
                f"{len(calibration)} calibration inputs; the tolerance is {max_error:g} "
                f"(agreement {min_agreement:g}): refused, use float32"
            )
        log(f"cut {cut.name}: head∘tail vs whole model: max abs error "
            f"{accuracy['max_abs_error']:.3g}, top-1 agreement {agree}")  # fmt: skip
    entry: dict[str, Any] = {"name": name, "at": list(cut.tensors), "all_server": cut.all_server}
    crossing = []
    for t in cut.crossing:
        vi = g.value_info(t)
        w = wire.get(t, {})
        enc = w.get("encoding", "float32") if vi.type.tensor_type.elem_type == 1 else None
        d = {**_sealing._describe(vi), "wire_name": g.wire_name(t, enc or "float32")}
        d["shape"] = known_dims(d["shape"])
        d["encoding"] = enc or d["dtype"]
        if "scale" in w:
            d["scale"] = w["scale"]
        crossing.append(d)
    entry["crossing"] = crossing
    # the head: public (plain ONNX) or sealed for a local worker
    if head is None:
        entry["head"] = None
    elif seal_head:
        res = _sealing.seal(head, model_id=f"{model_id}.head" + ("" if k == 0 else f".{name}"),
                            signing_key=signing_key, output=os.path.join(out, f"head-{name}.vault"))  # fmt: skip
        _hand_over(res, register)
        entry.update(head=f"head-{name}.vault", head_model_id=res.model_id, head_digest=res.digest)
    else:
        path = os.path.join(out, f"head-{name}.onnx")
        if big:
            onnx.save(head, path, save_as_external_data=True, location=f"head-{name}.onnx.data")
        else:
            onnx.save(head, path)
        entry.update(head=f"head-{name}.onnx", head_sha256=_sha256_file(path))
    tail_id = f"{model_id}.tail" + ("" if k == 0 else f".{name}")
    res = _sealing.seal(tail, model_id=tail_id, signing_key=signing_key,
                        output=os.path.join(out, f"tail-{name}.vault"),
                        batchable=batchable)  # fmt: skip
    _hand_over(res, register)
    entry.update(tail=f"tail-{name}.vault", tail_model_id=tail_id, tail_digest=res.digest)
    entry["cost"] = {**cost.to_json(), "cut": name}
    entry["accuracy"] = accuracy
    return entry


def _check_head_can_hand_over(g: CutGraph, cut: Cut, head: onnx.ModelProto) -> None:
    """onnxruntime's Python API gives a bfloat16, float8 or int4 tensor only as an
    OrtValue, from a run whose every input is an OrtValue, and makes none of a
    string, sequence or map: a head with such an input cannot hand over such a
    tensor (the caller's run would fail). Refused here, naming both."""
    special = [(t, onnx_type_name(g.elem_type(t))) for t in cut.crossing]
    special = [(t, d) for t, d in special if d in ORTVALUE_DTYPES]
    plain = [
        i.name for i in head.graph.input
        if i.type.WhichOneof("value") != "tensor_type"
        or i.type.tensor_type.elem_type == onnx.TensorProto.STRING
    ]  # fmt: skip
    if special and plain:
        t, d = special[0]
        raise SealError(
            f"cut {cut.name}: cut tensor {t!r} is {d}, which onnxruntime hands over only as "
            f"an OrtValue, and the head's input {plain[0]!r} (a string, sequence or map) "
            "cannot be one, so the caller's head could not run: cut where the tensor is "
            "another dtype (or Cast it to float32 in the model before the cut)"
        )


def _hand_over(
    res: _sealing.SealResult, register: Callable[[_sealing.SealResult], None] | None
) -> None:
    """Give the key to ``register`` (the key server), then overwrite it."""
    try:
        if register is None:
            raise ConfigError("split needs somewhere to register the package keys (register=...)")
        register(res)
    except BaseException:
        os.unlink(res.path)  # a package whose key is nowhere is useless
        raise
    finally:
        res.wipe_key()


def write_key_file(path: str, res: _sealing.SealResult) -> None:
    """For air-gapped use: the key in a 0600 file (what ``vault seal --key-out`` does)."""
    write_private_file(path, bytes(res.key).hex().encode() + b"\n")

"""Cut an ONNX graph at a set of tensors: a head (the caller's side) and a tail.

A *cut* is a set of top-level tensors such that every path from the graph's
inputs to its outputs crosses it. The head is every node the cut tensors
depend on; the tail is every node the outputs need that is not in the head.
Tensors the head makes and the tail also reads (a residual connection that
skips over the cut) cross as well: they are added to the crossing set, never
silently recomputed. Constant sub-graphs (nodes that depend on no graph
input) go to whichever side needs them, to both when both do.

Nodes with sub-graphs (If, Loop, Scan) are single nodes at the top level: a
cut is made between top-level tensors only, and the names a body reads from
the outer scope count as the node's inputs.

The vendor's policy decides which cuts exist at all:

- ``split_points``: the tensors a cut may be made at (each cut tensor must be
  one of them);
- ``protect_from``: tensors whose consumers and everything downstream of
  them must stay on the server (no such node may be in a head);
- neither: nothing may leave the server, every cut is refused.

A refused cut raises :class:`~vault.core.errors.SealError` whose message names
the offending path.

Example::

    g = CutGraph(model)
    cut = g.cut(["h2"], policy=Policy(split_points={"h2"}))
    cut.crossing          # ["h2"] (plus any skip tensor the tail still reads)
    head, tail = g.head_model(cut), g.tail_model(cut)
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

from ..core.errors import SealError
from ..core.graphs import onnx_type_name

__all__ = ["Cut", "CutGraph", "Policy", "node_key"]


@dataclass(frozen=True)
class Policy:
    """What the vendor lets leave the server (see the module docstring)."""

    split_points: frozenset[str] = frozenset()
    protect_from: frozenset[str] = frozenset()

    @property
    def allows_anything(self) -> bool:
        return bool(self.split_points or self.protect_from)


@dataclass
class Cut:
    """One valid cut: which nodes run where and which tensors cross."""

    tensors: list[str]  # as asked for (or the graph inputs: the all-server cut)
    crossing: list[str]  # what the head sends: the cut tensors plus skip tensors
    head_nodes: list[int] = field(default_factory=list)
    tail_nodes: list[int] = field(default_factory=list)

    @property
    def all_server(self) -> bool:
        return not self.head_nodes

    @property
    def name(self) -> str:
        return "(inputs)" if self.all_server else ",".join(self.tensors)


def node_key(node: onnx.NodeProto, index: int) -> str:
    """The name a node's cost is recorded under (its name, or ``#index``)."""
    return node.name or f"#{index}"


def _subgraph_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a sub-graph reads from its enclosing scopes."""
    local = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    refs: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in local:
                refs.add(name)
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                refs |= {r for r in _subgraph_refs(sub) if r not in local}
        local.update(o for o in node.output if o)
    return refs


def _attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _complete(t: onnx.TypeProto | None) -> bool:
    """A tensor type with its element type and a shape (dims may be symbolic)."""
    if t is None:
        return False
    if not t.HasField("tensor_type"):
        return t.WhichOneof("value") is not None  # sequences, maps: as good as they get
    return bool(t.tensor_type.elem_type) and t.tensor_type.HasField("shape")


def _merge_types(types: dict[str, onnx.TypeProto], graph: onnx.GraphProto) -> None:
    """Add the graph's value types to ``types`` where they say more than what is there."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if not vi.HasField("type") or vi.type.WhichOneof("value") is None:
            continue
        have = types.get(vi.name)
        if have is None or (not _complete(have) and _complete(vi.type)):
            types[vi.name] = vi.type
        elif (
            have.HasField("tensor_type")
            and not have.tensor_type.elem_type
            and vi.type.HasField("tensor_type")
            and vi.type.tensor_type.elem_type
        ):
            types[vi.name] = vi.type


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference (it knows onnxruntime's own ops and
    merges symbolic dims), or None where it is missing or gives up."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # needs sympy; onnx's inference alone then
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = SymbolicShapeInference.infer_shapes(
                model, auto_merge=True, guess_output_rank=True
            )
    except Exception:  # noqa: BLE001 - it raises on what it does not know
        return None
    return out if isinstance(out, onnx.ModelProto) else None


class CutGraph:
    """An index over a model's top-level graph for cutting (see module docstring)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name for t in g.initializer}
        self.inputs = [vi.name for vi in g.input if vi.name not in self.inits]
        self.outputs = [vi.name for vi in g.output]
        self.producer: dict[str, int] = {}
        self.reads: list[list[str]] = []  # explicit and outer-scope inputs, in order
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            names = [n for n in node.input if n]
            for attr in node.attribute:
                for sub in _attr_graphs(attr):
                    names += sorted(_subgraph_refs(sub))
            seen: list[str] = []
            for n in names:
                if n not in seen:
                    seen.append(n)
            self.reads.append(seen)
            for n in seen:
                self.consumers.setdefault(n, []).append(i)
            for o in node.output:
                if o:
                    self.producer[o] = i
        inputs = set(self.inputs)
        # dynamic: depends on a graph input (a constant sub-graph does not)
        self.dynamic = [False] * len(self.nodes)
        for i in range(len(self.nodes)):
            self.dynamic[i] = any(
                n in inputs or (n in self.producer and self.dynamic[self.producer[n]])
                for n in self.reads[i]
            )
        self._types = self._infer_types()
        # each tensor's shape in one run (observe_shapes): the sizes of dims
        # inference left unknown, for what a row of it costs on the wire
        self.observed: dict[str, tuple[int, ...]] = {}

    # -- types ------------------------------------------------------------------------

    def _infer_types(self) -> dict[str, onnx.TypeProto]:
        """Every top-level tensor's type: what the model declares, then onnx's
        shape inference, then onnxruntime's symbolic inference for what onnx's
        leaves unknown (exporters rarely write value_info for intermediates;
        onnx's inference stops at ops it has no function for, and refuses a
        model of a newer IR version than its own)."""
        from ..sealing import _too_big, _without_weights

        m = self.model
        light = onnx.ModelProto()
        light.CopyFrom(_without_weights(m) if _too_big(m) else m)
        # the IR version says nothing about types: one this onnx knows lets it infer
        light.ir_version = min(light.ir_version, onnx.IR_VERSION)
        types: dict[str, onnx.TypeProto] = {}
        sources: list[onnx.ModelProto] = [light]
        try:
            sources.append(onnx.shape_inference.infer_shapes(light, strict_mode=False))
        except Exception:  # noqa: BLE001 - onnxruntime's inference below may still know
            pass
        for src in sources:
            _merge_types(types, src.graph)
        wanted = [o for i, n in enumerate(self.nodes) if self.dynamic[i] for o in n.output if o]
        if any(not _complete(types.get(o)) for o in wanted):
            symbolic = _symbolic_inference(light)
            if symbolic is not None:
                _merge_types(types, symbolic.graph)
        return types

    def typed(self, name: str) -> bool:
        """Whether ``name`` is a tensor of a known element type (a cut tensor must be)."""
        t = self._types.get(name)
        return t is not None and t.HasField("tensor_type") and bool(t.tensor_type.elem_type)

    def value_info(self, name: str, new_name: str | None = None) -> onnx.ValueInfoProto:
        t = self._types.get(name)
        if t is None or not self.typed(name):
            what = (
                f"is a {t.WhichOneof('value')}, not a tensor"
                if t is not None and t.WhichOneof("value") not in (None, "tensor_type")
                else "has a type neither onnx's nor onnxruntime's shape inference can infer"
            )
            raise SealError(
                f"tensor {name!r} {what}; a cut tensor needs a known tensor element type "
                "(cut elsewhere, or add value_info for it)"
            )
        vi = onnx.ValueInfoProto()
        vi.name = new_name or name
        vi.type.CopyFrom(t)
        return vi

    def elem_type(self, name: str) -> int:
        return int(self.value_info(name).type.tensor_type.elem_type)

    # -- policy -------------------------------------------------------------------------

    def protected_nodes(self, policy: Policy) -> set[int]:
        out: set[int] = set()
        todo = deque(i for t in policy.protect_from for i in self.consumers.get(t, []))
        while todo:
            i = todo.popleft()
            if i in out:
                continue
            out.add(i)
            for o in self.nodes[i].output:
                todo.extend(self.consumers.get(o, []))
        return out

    def known_tensor(self, name: str) -> bool:
        return name in self.producer or name in self.inputs

    def fresh(self, name: str) -> str:
        """``name``, or it with ``_`` added until no tensor, input or weight of
        the model has it (a model tensor named ``r__f16`` collided with the
        wire's own, and onnxruntime refused the head: "Duplicate definition")."""
        while self.known_tensor(name) or name in self.inits:
            name += "_"
        return name

    def wire_name(self, tensor: str, encoding: str) -> str:
        """The name ``tensor`` crosses under in ``encoding`` (:func:`wire_name`,
        made :meth:`fresh`)."""
        w = wire_name(tensor, encoding)
        return w if w == tensor else self.fresh(w)

    # -- cutting --------------------------------------------------------------------------

    def _path_str(self, names: Sequence[str]) -> str:
        return " -> ".join(names)

    def all_server(self) -> Cut:
        """The degenerate cut at the graph inputs: the whole model on the server."""
        return Cut(
            tensors=list(self.inputs),
            crossing=list(self.inputs),
            head_nodes=[],
            tail_nodes=sorted(self._ancestors(self.outputs, stop=set())),
        )

    def _ancestors(self, names: Iterable[str], stop: set[int]) -> set[int]:
        out: set[int] = set()
        todo = deque(self.producer[n] for n in names if n in self.producer)
        while todo:
            i = todo.popleft()
            if i in out or i in stop:
                continue
            out.add(i)
            todo.extend(self.producer[n] for n in self.reads[i] if n in self.producer)
        return out

    def cut(self, tensors: Sequence[str], *, policy: Policy) -> Cut:
        """Validate the cut at ``tensors`` under ``policy``; refusals name the path."""
        if not policy.allows_anything:
            raise SealError(
                "the vendor allows nothing to leave the server: declare the tensors a cut may "
                "be made at (--split-point TENSOR) or a protected region (--protect-from TENSOR)"
            )
        if not tensors:
            raise SealError("a cut needs at least one tensor")
        for t in tensors:
            if t not in self.producer:
                where = (
                    "is a graph input (cut there means no head: all on the server)"
                    if t in self.inputs
                    else "is not a tensor of the top-level graph (cuts inside If/Loop/Scan "
                    "bodies are not possible; cut before or after the node)"
                    if not self.known_tensor(t)
                    else ""
                )
                raise SealError(f"cut tensor {t!r} {where}".rstrip())
            if t in self.outputs:
                raise SealError(f"cut tensor {t!r} is a model output: nothing would be left to cut")
            if not self.dynamic[self.producer[t]]:
                raise SealError(f"cut tensor {t!r} is a constant: it depends on no model input")
            if policy.split_points and t not in policy.split_points:
                raise SealError(
                    f"cut tensor {t!r} is not an allowed split point "
                    f"(allowed: {', '.join(sorted(policy.split_points))})"
                )
        head_all = self._ancestors(tensors, stop=set())  # constants too: the head model needs them
        head = {i for i in head_all if self.dynamic[i]}
        self._check_protected(head, tensors, policy)
        # the tail: walk back from the outputs, stopping at head nodes
        parent: dict[int, int | None] = {}
        crossing: list[str] = []
        tail: set[int] = set()
        todo: deque[tuple[int, int | None]] = deque()
        for o in self.outputs:
            if o in self.inputs:
                raise SealError(f"output {o!r} is a model input: it would bypass the cut")
            i = self.producer[o]
            if i in head:
                raise SealError(
                    f"output {o!r} is computed before the cut ({self._path_str([*tensors, o])}"
                    " is not a path forward): cut later, or cut every branch"
                )
            todo.append((i, None))
        while todo:
            i, via = todo.popleft()
            if i in tail:
                continue
            tail.add(i)
            parent[i] = via
            for n in self.reads[i]:
                if n in self.inputs:
                    path = [n, *self._forward_path(i, parent)]
                    raise SealError(
                        "the cut does not separate the model: "
                        f"{self._path_str(path)} reaches an output without crossing "
                        f"{', '.join(tensors)}"
                    )
                j = self.producer.get(n)
                if j is None:
                    continue  # an initializer
                if j in head:
                    if n not in crossing:
                        crossing.append(n)
                else:
                    todo.append((j, i))
        unused = [t for t in tensors if t not in crossing]
        if unused:
            raise SealError(
                f"cut tensor {unused[0]!r} is not read after the cut (it lies before another "
                "cut tensor); drop it from the cut"
            )
        ordered = list(tensors) + [c for c in crossing if c not in tensors]
        for t in ordered:
            et = self._types[t].tensor_type.elem_type if self.typed(t) else 0
            if et and onnx_type_name(et) is None:
                raise SealError(
                    f"cut tensor {t!r} is {TensorProto.DataType.Name(et).lower()}, which the "
                    "wire between the caller and the tail cannot carry: cut where the tensor "
                    "is another dtype (or Cast it in the model before the cut)"
                )
        return Cut(
            tensors=list(tensors),
            crossing=ordered,
            head_nodes=sorted(head_all),
            tail_nodes=sorted(tail),
        )

    def _forward_path(self, i: int, parent: dict[int, int | None]) -> list[str]:
        """Tensor names from node ``i`` forward to the output the walk came from."""
        names: list[str] = []
        cur: int | None = i
        while cur is not None:
            node = self.nodes[cur]
            names.append(next((o for o in node.output if o), node_key(node, cur)))
            cur = parent.get(cur)
        return names

    def _check_protected(self, head: set[int], tensors: Sequence[str], policy: Policy) -> None:
        if not policy.protect_from:
            return
        bad = sorted(head & self.protected_nodes(policy))
        if not bad:
            return
        # a path protect tensor -> ... -> cut tensor through head nodes
        targets = set(tensors)
        for start in sorted(policy.protect_from):
            prev: dict[str, str | None] = {start: None}
            todo = deque([start])
            while todo:
                t = todo.popleft()
                if t in targets:
                    path = [t]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])  # type: ignore[arg-type]
                    path.reverse()
                    node = self.nodes[self.producer[path[1]]] if len(path) > 1 else None
                    what = f"node {node_key(node, self.producer[path[1]])!r} " if node else ""
                    raise SealError(
                        f"the cut would put protected {what}on the caller's side: "
                        f"{self._path_str(path)} (everything downstream of {start!r} stays "
                        "on the server)"
                    )
                for i in self.consumers.get(t, []):
                    if i not in head:
                        continue
                    for o in self.nodes[i].output:
                        if o and o not in prev:
                            prev[o] = t
                            todo.append(o)
        node = self.nodes[bad[0]]
        raise SealError(
            f"the cut would put protected node {node_key(node, bad[0])!r} on the caller's side"
        )

    def candidates(self, policy: Policy, *, skipped: list[str] | None = None) -> list[Cut]:
        """Every single-tensor cut the policy allows (deduplicated by head), in graph
        order. A cut whose crossing tensors are not all typed tensors cannot be
        shipped (the wire and the head's outputs need a dtype): it is left out, and
        its tensor named in ``skipped`` when a list is given. Identity nodes (what
        composing a pipeline puts between its stages: ``raw`` -> ``pre/raw``) are
        aliases, not work: two heads that differ only by them are one cut (the
        first in graph order), and a head of nothing else is the all-server cut,
        which the planner has anyway (before, ``--alternatives`` could ship such
        a do-nothing head as a second choice)."""
        names = (
            [t for t in policy.split_points]
            if policy.split_points
            else [o for i, n in enumerate(self.nodes) if self.dynamic[i] for o in n.output if o]
        )
        order = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        out: list[Cut] = []
        seen: set[tuple[int, ...]] = set()
        for t in sorted(set(names), key=lambda n: order.get(n, -1)):
            try:
                c = self.cut([t], policy=policy)
            except SealError:
                continue
            if not all(self.typed(x) for x in c.crossing):
                if skipped is not None:
                    skipped.append(t)
                continue
            key = tuple(i for i in c.head_nodes if self.nodes[i].op_type != "Identity")
            if key and key not in seen:
                seen.add(key)
                out.append(c)
        return out

    # -- the two models ----------------------------------------------------------------------

    def _sub_model(
        self,
        node_ids: Sequence[int],
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        name: str,
        prologue: Sequence[onnx.NodeProto] = (),
        epilogue: Sequence[onnx.NodeProto] = (),
        extra_inits: Sequence[TensorProto] = (),
    ) -> onnx.ModelProto:
        src = self.model
        nodes = [self.nodes[i] for i in node_ids]
        used = {n for i in node_ids for n in self.reads[i]}
        used |= {n for p in (*prologue, *epilogue) for n in p.input}
        graph = onnx.GraphProto()
        graph.name = name
        graph.node.extend(prologue)
        graph.node.extend(nodes)
        graph.node.extend(epilogue)
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        # weights are shared by reference where protobuf allows: CopyFrom per tensor
        graph.initializer.extend(t for t in src.graph.initializer if t.name in used)
        graph.initializer.extend(extra_inits)
        graph.sparse_initializer.extend(
            t for t in src.graph.sparse_initializer if t.values.name in used
        )
        produced = {o for n in nodes for o in n.output}
        graph.value_info.extend(vi for vi in src.graph.value_info if vi.name in produced)
        m = onnx.ModelProto()
        m.ir_version = src.ir_version
        m.opset_import.extend(src.opset_import)
        m.functions.extend(src.functions)
        m.producer_name = "vault-split"
        m.graph.CopyFrom(graph)
        return m

    def head_model(self, cut: Cut, wire: dict[str, Any] | None = None) -> onnx.ModelProto:
        """The head: the graph inputs in, the crossing tensors (wire-encoded) out."""
        g = self.model.graph
        inputs = [vi for vi in g.input if vi.name in self.inputs]
        epilogue, outputs, inits = _wire_nodes(self, cut.crossing, wire or {}, encode=True)
        return self._sub_model(cut.head_nodes, list(inputs), outputs, "head", epilogue=epilogue,
                               extra_inits=inits)  # fmt: skip

    def tail_model(self, cut: Cut, wire: dict[str, Any] | None = None) -> onnx.ModelProto:
        """The tail: the crossing tensors (wire-encoded) in, the model outputs out."""
        g = self.model.graph
        prologue, inputs, inits = _wire_nodes(self, cut.crossing, wire or {}, encode=False)
        if cut.all_server:
            inputs = [vi for vi in g.input if vi.name in self.inputs]
        return self._sub_model(cut.tail_nodes, inputs, list(g.output), "tail", prologue=prologue,
                               extra_inits=inits)  # fmt: skip


# --- wire encodings ----------------------------------------------------------------------------

WIRE_SUFFIX = {"float16": "__f16", "int8": "__q8"}


def wire_name(tensor: str, encoding: str) -> str:
    return tensor + WIRE_SUFFIX.get(encoding, "")


def _wire_nodes(
    g: CutGraph, crossing: Sequence[str], wire: dict[str, Any], *, encode: bool
) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[TensorProto]]:
    """The nodes that put each crossing tensor into its wire encoding at the
    end of the head (``encode``), or take it back out at the start of the
    tail, with the wire value infos and the scale/zero-point initializers."""
    prefix = "wire" if encode else "unwire"
    nodes: list[onnx.NodeProto] = []
    infos: list[onnx.ValueInfoProto] = []
    inits: list[TensorProto] = []
    for t in crossing:
        enc = wire.get(t, {}).get("encoding", "float32")
        if enc == "float32" or g.elem_type(t) != TensorProto.FLOAT:
            infos.append(g.value_info(t))
            continue
        w = g.wire_name(t, enc)
        src, dst = (t, w) if encode else (w, t)
        vi = g.value_info(t, w)
        if enc == "float16":
            to = TensorProto.FLOAT16 if encode else TensorProto.FLOAT
            nodes.append(helper.make_node("Cast", [src], [dst], to=to, name=f"{prefix}/{w}"))
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
        else:
            s, z = g.fresh(f"{prefix}/{t}/scale"), g.fresh(f"{prefix}/{t}/zero")
            inits.append(helper.make_tensor(s, TensorProto.FLOAT, [], [float(wire[t]["scale"])]))
            inits.append(helper.make_tensor(z, TensorProto.INT8, [], [0]))
            op = "QuantizeLinear" if encode else "DequantizeLinear"
            nodes.append(helper.make_node(op, [src, s, z], [dst], name=f"{prefix}/{w}"))
            vi.type.tensor_type.elem_type = TensorProto.INT8
        infos.append(vi)
    return nodes, infos, inits

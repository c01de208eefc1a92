"""Check a publisher's ``batchable`` declaration by running the pipeline.

A package declared batchable (``vault seal --batchable``) says: dim 0 of
every input and every output is a batch of independent rows, so row ``i`` of
every output depends on row ``i`` of the inputs alone. The worker service
relies on that to join calls of different callers into one batch: a model
that normalises over dim 0 (``y = x - mean(x)``), or whose dim 0 is time (an
LSTM exported sequence-first), would let one caller's rows change, and
reveal, another caller's results. So :func:`check_rows` runs the sealed
graphs (as the worker will load them: weights from in-memory files) on
random rows together and apart, and refuses the declaration with a
:class:`~vault.core.errors.SealError` that names the output and the row
whose value depends on another row, or an output whose dim 0 is not the
rows' count.

How it samples: several row counts, a fresh random draw for each; floats
from a standard normal, integers in ``[0, 4)`` (safe as indices and
categories), booleans, short strings; fixed trailing dims as declared,
symbolic ones a small size (the same for one name). A pipeline whose inputs
cannot be sampled (a sequence or map, a dtype numpy cannot draw, an unknown
rank, a fixed dim 0), or that does not run on what was drawn, has its
declaration refused with the reason: never guessed.

Example::

    check_rows([("pipeline", graph_bytes)], {"pipeline.weights": blob},
               inputs=manifest["inputs"], outputs=manifest["outputs"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SealError

__all__ = ["ROW_COUNTS", "check_rows", "session_in_memory"]

ROW_COUNTS = (2, 3, 7)  # one fresh draw each; every row is also run alone
_TRAILING_SIZES = (3, 2, 1, 4)  # tried in turn for symbolic trailing dims
_INT_HIGH = 4
_FLOATS = ("float16", "float32", "float64")
_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_SAMPLED = (*_FLOATS, *_INTS, "bool", "string")
_WHY = "--batchable refused"


@dataclass(frozen=True)
class _Input:
    name: str
    dtype: str
    shape: list[Any]  # dim 0 excluded: trailing dims (int, str or None)


def _refuse(msg: str) -> SealError:
    return SealError(f"{_WHY}: {msg}")


def _signature(inputs: Sequence[Mapping[str, Any]],
               outputs: Sequence[Mapping[str, Any]]) -> list[_Input]:  # fmt: skip
    """The inputs to sample; refuses what cannot be sampled or batched."""
    if not inputs:
        raise _refuse("the pipeline has no inputs, so it has no rows")
    out: list[_Input] = []
    for t in inputs:
        name, dtype, shape = str(t["name"]), str(t["dtype"]), t.get("shape")
        if dtype not in _SAMPLED:
            kind = "value" if "<" in dtype else "dtype"
            raise _refuse(
                f"input {name!r} is a {dtype} {kind}: this check cannot draw rows of it, so "
                "the declaration cannot be checked (batch only tensors of float, int, bool "
                "or string)"
            )
        if shape is None:
            raise _refuse(f"input {name!r} declares no shape: which dim is the batch is unknown")
        if len(shape) == 0:
            raise _refuse(f"input {name!r} is a scalar: it has no dim 0 to batch")
        if isinstance(shape[0], int):
            raise _refuse(
                f"dim 0 of input {name!r} is fixed at {shape[0]}: a batch of rows has no fixed "
                "size (export it with a dynamic first dim)"
            )
        out.append(_Input(name, dtype, list(shape[1:])))
    for t in outputs:
        name, dtype, shape = str(t["name"]), str(t["dtype"]), t.get("shape")
        if "<" in dtype:
            hint = (
                " (scikit-learn's ZipMap: convert with options={'zipmap': False})"
                if dtype.startswith("sequence<map<")
                else ""
            )
            raise _refuse(
                f"output {name!r} is a {dtype}, not a tensor: its rows cannot be split back{hint}"
            )
        if shape is not None and len(shape) == 0:
            raise _refuse(f"output {name!r} is a scalar: it has no dim 0 of rows")
        if shape is not None and isinstance(shape[0], int):
            raise _refuse(f"dim 0 of output {name!r} is fixed at {shape[0]}, not the rows' count")
    return out


def _draw(rng: np.random.Generator, inp: _Input, rows: int,
          sizes: dict[Any, int], fallback: int) -> np.ndarray[Any, Any]:  # fmt: skip
    dims = [rows]
    for i, d in enumerate(inp.shape):
        if isinstance(d, int) and not isinstance(d, bool):
            dims.append(d)
        else:  # a named dim: one size for the name; an unnamed one: per input and axis
            key = d if isinstance(d, str) and d else (inp.name, i)
            dims.append(sizes.setdefault(key, fallback))
    shape = tuple(dims)
    if inp.dtype in _FLOATS:
        return rng.standard_normal(shape).astype(inp.dtype)
    if inp.dtype in _INTS:
        return rng.integers(0, _INT_HIGH, shape).astype(inp.dtype)
    if inp.dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    words = np.array(["a", "b", "cat", "dog", "x y", ""], dtype=object)
    return words[rng.integers(0, len(words), shape)]


def session_in_memory(data: bytes, names: Sequence[str], bufs: Sequence[Any], *,
                      optimise: bool = True) -> Any:  # fmt: skip
    """An onnxruntime CPU session of one stored graph as the worker loads it:
    its weights from the in-memory files (``names``, their buffers ``bufs``),
    one thread (the same summation order every run); ``optimise`` False:
    graph optimisations off (a load that only asks whether it loads).
    onnxruntime's own exception when it does not."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if not optimise:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if names:
        so.add_external_initializers_from_files_in_memory(list(names), list(bufs),
                                                          [len(b) for b in bufs])  # fmt: skip
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class _Runner:
    """The stored graphs as the worker loads them (weights from in-memory
    files), chained by name when they were not composed into one."""

    def __init__(self, graphs: Sequence[tuple[str, bytes]], files: Mapping[str, Any]) -> None:
        self.stages: list[tuple[Any, list[str], list[str]]] = []
        names = list(files)
        bufs = [np.frombuffer(files[n], np.uint8) for n in names]
        for stage, data in graphs:
            try:
                sess = session_in_memory(data, names, bufs)
            except Exception as exc:  # the publisher's own model: its text helps them
                raise _refuse(f"the {stage} graph does not load in onnxruntime "
                              f"({_first_line(exc)})") from None  # fmt: skip
            ins = [i.name for i in sess.get_inputs()]
            outs = [o.name for o in sess.get_outputs()]
            self.stages.append((sess, ins, outs))
        self._keep = bufs

    def run(self, feeds: Mapping[str, Any], want: Sequence[str]) -> dict[str, Any]:
        values: dict[str, Any] = dict(feeds)
        for sess, ins, outs in self.stages:
            res = sess.run(outs, {n: values[n] for n in ins if n in values})
            values.update(zip(outs, res))
        return {n: values[n] for n in want}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _close(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], scale: float) -> tuple[bool, float]:
    """Whether two rows agree, and by how much they differ. Floats within a
    tolerance suited to reductions whose order depends on the batch size (a
    GEMM blocks differently for 1 row and for 7): relative 1e-4 and absolute
    1e-5 of the output's magnitude (float16: 1e-2 and 1e-3); anything else exactly.
    A row of a 1-D output is a scalar (of a string output: a str), made an array."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False, float("inf")
    if a.dtype.kind in "fc":
        rtol, atol = (1e-2, 1e-3) if a.dtype == np.float16 else (1e-4, 1e-5)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ok = bool(np.allclose(a64, b64, rtol=rtol, atol=atol * (1.0 + scale), equal_nan=True))
        with np.errstate(invalid="ignore"):
            diff = np.abs(a64 - b64)
        worst = float(np.nanmax(diff)) if diff.size and not np.all(np.isnan(diff)) else 0.0
        return ok, worst
    same = bool(np.array_equal(a, b))
    return same, 0.0 if same else 1.0


def _magnitude(arr: np.ndarray[Any, Any]) -> float:
    if arr.dtype.kind not in "fc" or arr.size == 0:
        return 0.0
    finite = np.abs(arr[np.isfinite(arr)]).astype(np.float64)
    return float(finite.max()) if finite.size else 0.0


def _outputs_of(runner: _Runner, feeds: Mapping[str, Any], want: Sequence[str],
                rows: int) -> dict[str, np.ndarray[Any, Any]]:  # fmt: skip
    res = runner.run(feeds, want)
    for name, arr in res.items():
        if not isinstance(arr, np.ndarray):
            raise _refuse(f"output {name!r} is not a tensor: its rows cannot be split back")
        if arr.ndim == 0 or arr.shape[0] != rows:
            got = "a scalar" if arr.ndim == 0 else f"dim 0 of {arr.shape[0]}"
            raise _refuse(
                f"output {name!r} has {got} for {rows} rows: its dim 0 is not the rows' count"
            )
    return res


def _sample_runs(runner: _Runner, sig: list[_Input], want: Sequence[str],
                 rng: np.random.Generator) -> tuple[int, Any]:  # fmt: skip
    """A size for symbolic trailing dims on which the pipeline runs, and
    that first run (inputs, outputs) on ROW_COUNTS[0] rows."""
    errors: list[str] = []
    for fallback in _TRAILING_SIZES:
        sizes: dict[Any, int] = {}
        feeds = {i.name: _draw(rng, i, ROW_COUNTS[0], sizes, fallback) for i in sig}
        try:
            return fallback, (feeds, sizes, runner.run(feeds, want))
        except Exception as exc:  # noqa: BLE001 - any failure: try another size
            errors.append(_first_line(exc))
    raise _refuse(
        "the pipeline does not run on sampled rows (floats from a normal distribution, "
        f"integers in [0, {_INT_HIGH}), short strings), so the declaration cannot be "
        f"checked: {errors[0]}"
    )


def check_rows(
    graphs: Sequence[tuple[str, bytes]],
    files: Mapping[str, Any],
    *,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    seed: int | None = None,
) -> None:
    """Refuse (SealError) unless every output row depends on its own input
    row alone and every output's dim 0 is the rows' count."""
    sig = _signature(inputs, outputs)
    want = [str(t["name"]) for t in outputs]
    runner = _Runner(graphs, files)
    rng = np.random.default_rng(seed)
    fallback, _ = _sample_runs(runner, sig, want, rng)
    for rows in ROW_COUNTS:
        sizes: dict[Any, int] = {}
        feeds = {i.name: _draw(rng, i, rows, sizes, fallback) for i in sig}
        try:
            together = _outputs_of(runner, feeds, want, rows)
            again = _outputs_of(runner, feeds, want, rows)
            backwards = _outputs_of(runner, {k: v[::-1].copy() for k, v in feeds.items()},
                                    want, rows)  # fmt: skip
            alone = [
                _outputs_of(runner, {k: v[r : r + 1] for k, v in feeds.items()}, want, 1)
                for r in range(rows)
            ]
        except SealError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a Reshape that fixes the batch size
            raise _refuse(
                f"the pipeline does not run on sampled rows (on {rows} rows: "
                f"{_first_line(exc)}), so the declaration cannot be checked"
            ) from None
        for name in want:
            scale = _magnitude(together[name])
            ok, _ = _close(together[name], again[name], scale)
            if not ok:
                raise _refuse(
                    f"output {name!r} differs between two runs of the same {rows} rows: the "
                    "pipeline is not deterministic, so its rows cannot be checked"
                )
            for r in range(rows):  # each row alone first: the plainest evidence
                same, diff = _close(together[name][r], alone[r][name][0], scale)
                if not same:
                    raise _refuse(
                        f"output {name!r} row {r} depends on other rows: computed with "
                        f"{rows} rows together it differs from row {r} computed alone "
                        f"(by up to {diff:.3g}); calls of different callers must not be joined"
                    )
            for r in range(rows):
                same, diff = _close(together[name][r], backwards[name][rows - 1 - r], scale)
                if not same:
                    raise _refuse(
                        f"output {name!r} row {r} depends on other rows: it changes when the "
                        f"rows come in another order (by up to {diff:.3g}); calls of different "
                        "callers must not be joined"
                    )

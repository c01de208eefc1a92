"""``vault seal --batchable``: the publisher's declaration, checked by running
the pipeline on random rows together and apart, signed into the manifest and
shown by ``vault inspect`` (issue 17, item 1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli import vault_in_process as vault
from tests.models import (
    batch_centred,
    classifier_pipeline,
    lstm_sequence_first,
    mlp,
    sklearn_shaped_regressor,
)
from tests.sealed import seal_for_test
from vault.core import crypto as _crypto
from vault.core.errors import SealError
from vault.core.package import Package
from vault.hybrid.publish import split


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any],
           inits: list[Any] = (), opset: int = 17) -> onnx.ModelProto:  # type: ignore[assignment]  # fmt: skip
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])  # fmt: skip
    m.ir_version = 8
    return m


def _vi(name: str, t: int, shape: list[Any] | None) -> Any:
    return helper.make_tensor_value_info(name, t, shape)


def test_vault_seal_batchable_checks_declares_and_inspect_shows_it(tmp_path: Path) -> None:
    pre, model, post = classifier_pipeline()
    for name, m in (("pre", pre), ("model", model), ("post", post),
                    ("centred", batch_centred()), ("lstm", lstm_sequence_first())):  # fmt: skip
        onnx.save(m, tmp_path / f"{name}.onnx")
    _crypto.PublisherKey.generate().save(tmp_path / "publisher.key", tmp_path / "publisher.pub")
    common = ("--signing-key", "publisher.key", "--key-out")
    r = vault("seal", "model.onnx", "--pre", "pre.onnx", "--post", "post.onnx", "--model-id",
              "clf", *common, "clf.key", "-o", "clf.vault", "--batchable", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "batchable: declared, and checked" in r.stdout
    r = vault("inspect", "clf.vault", cwd=tmp_path)
    assert r.returncode == 0 and "batchable     yes" in r.stdout
    r = vault("inspect", "clf.vault", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["batchable"] is True
    # without the flag: declared not batchable, and inspect says what that means
    r = vault("seal", "model.onnx", "--model-id", "plain", *common, "plain.key",
              "-o", "plain.vault", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(vault("inspect", "plain.vault", "--json", cwd=tmp_path).stdout)[
        "batchable"] is False  # fmt: skip
    assert "batchable     no" in vault("inspect", "plain.vault", cwd=tmp_path).stdout
    # a model whose rows depend on each other: refused, the output and row named
    for bad in ("centred", "lstm"):
        r = vault("seal", f"{bad}.onnx", "--model-id", bad, *common, f"{bad}.key",
                  "-o", f"{bad}.vault", "--batchable", cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2
        assert "error[seal]: --batchable refused: output 'y' row" in r.stderr
        assert "depends on other rows" in r.stderr
        assert r.stderr.count("\n") == 1  # one line, no traceback
        assert not (tmp_path / f"{bad}.vault").exists()


def test_the_signature_is_not_the_evidence(tmp_path: Path) -> None:
    # both have the same symbolic dim 0 in and out; only one keeps rows apart
    good = seal_for_test(tmp_path, mlp(), name="good", batchable=True)
    assert good.manifest["batchable"] is True
    with Package.load(good.path) as pkg:
        assert pkg.batchable is True
    with pytest.raises(SealError, match=r"output 'y' row \d+ depends on other rows"):
        seal_for_test(tmp_path, batch_centred(), name="bad", batchable=True)
    # skl2onnx leaves dim 0 unnamed: a declaration is what counts
    skl = seal_for_test(tmp_path, sklearn_shaped_regressor(), name="skl", batchable=True)
    assert skl.manifest["inputs"][0]["shape"] == [None, 4]


def test_inputs_of_every_sampled_dtype_and_symbolic_trailing_dims(tmp_path: Path) -> None:
    emb = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "table"
    )
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),  # int ids in [0, 4)
        helper.make_node("ReduceMean", ["e"], ["es"], axes=[1], keepdims=0),  # over T
        helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["es", "mf"], ["y"]),
        helper.make_node("Identity", ["words"], ["w"]),
        helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["hf", "hf"], ["h2"]),
    ]
    m = _model(nodes,
               [_vi("ids", TensorProto.INT64, ["N", "T"]), _vi("mask", TensorProto.BOOL, ["N", 3]),
                _vi("words", TensorProto.STRING, ["N", "T"]),
                _vi("h", TensorProto.FLOAT16, ["N", None, 2])],
               [_vi("y", TensorProto.FLOAT, ["N", 3]), _vi("w", TensorProto.STRING, ["N", "T"]),
                _vi("h2", TensorProto.FLOAT, ["N", None, 2])],
               [emb])  # fmt: skip
    s = seal_for_test(tmp_path, m, name="mixed", batchable=True)
    assert s.manifest["batchable"] is True


def test_a_one_dimensional_string_output_is_checked_row_by_row(tmp_path: Path) -> None:
    """A row of a 1-D string output is a str, not an array: the check took
    its shape and `vault seal --batchable` ended in a traceback (Cast int64
    -> string over [N]). Control: a string output whose rows depend on each
    other is still refused, by name."""
    one = _model([helper.make_node("Cast", ["ids"], ["names"], to=TensorProto.STRING)],
                 [_vi("ids", TensorProto.INT64, ["N"])], [_vi("names", TensorProto.STRING, ["N"])])  # fmt: skip
    assert seal_for_test(tmp_path, one, name="one", batchable=True).manifest["batchable"] is True
    mixed = _model([helper.make_node("ReduceSum", ["ids"], ["s"], keepdims=1),
                    helper.make_node("Add", ["ids", "s"], ["t"]),
                    helper.make_node("Cast", ["t"], ["names"], to=TensorProto.STRING)],
                   [_vi("ids", TensorProto.INT64, ["N"])],
                   [_vi("names", TensorProto.STRING, ["N"])])  # fmt: skip
    with pytest.raises(SealError, match=r"output 'names' row \d+ depends on other rows"):
        seal_for_test(tmp_path, mixed, name="mixed", batchable=True)


def test_declarations_that_cannot_hold_or_be_checked_are_refused(tmp_path: Path) -> None:
    f = TensorProto.FLOAT

    def refused(m: onnx.ModelProto, match: str) -> None:
        with pytest.raises(SealError, match=match):
            seal_for_test(tmp_path, m, name="m", batchable=True)

    # dim 0 of an output is not the rows' count (a sum over the batch)
    refused(_model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[0], keepdims=1)],
                   [_vi("x", f, ["N", 4])], [_vi("y", f, ["M", 4])]),
            r"output 'y' has dim 0 of 1 for 2 rows")  # fmt: skip
    # a fixed dim 0
    refused(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", f, [1, 4])],
                   [_vi("y", f, [1, 4])]), r"dim 0 of input 'x' is fixed at 1")  # fmt: skip
    # not deterministic: rows cannot be compared
    refused(_model([helper.make_node("RandomNormalLike", ["x"], ["y"])], [_vi("x", f, ["N", 4])],
                   [_vi("y", f, ["N", 4])]), r"not deterministic")  # fmt: skip
    # a dtype this check cannot draw
    refused(_model([helper.make_node("Cast", ["x"], ["y"], to=f)],
                   [_vi("x", TensorProto.BFLOAT16, ["N", 4])], [_vi("y", f, ["N", 4])]),
            r"input 'x' is a bfloat16 dtype: this check cannot draw rows")  # fmt: skip
    # an input that is not a tensor
    seq = helper.make_tensor_sequence_value_info("xs", f, ["N"])
    refused(_model([helper.make_node("ConcatFromSequence", ["xs"], ["y"], axis=0)], [seq],
                   [_vi("y", f, ["N"])]), r"input 'xs' is a sequence<float32> value")  # fmt: skip
    # ZipMap's sequence of maps: the hint says how to export it
    zipmap = helper.make_value_info(
        "probs",
        helper.make_sequence_type_proto(
            helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(f, []))
        ),
    )
    refused(_model([helper.make_node("ZipMap", ["x"], ["probs"], domain="ai.onnx.ml",
                                     classlabels_int64s=[0, 1])],
                   [_vi("x", f, ["N", 2])], [zipmap]),
            r"output 'probs' is a sequence<map<int64,float32>>.*zipmap")  # fmt: skip
    # values the sampled integers cannot index: refused, never guessed
    table = numpy_helper.from_array(np.ones((2, 3), np.float32), "table")
    refused(_model([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
                   [_vi("ids", TensorProto.INT64, ["N"])], [_vi("y", f, ["N", 3])], [table]),
            r"does not run on sampled rows")  # fmt: skip


def test_split_tails_carry_a_checked_declaration(tmp_path: Path) -> None:
    pk = _crypto.PublisherKey.generate()
    keys: dict[str, bytes] = {}

    def register(res: Any) -> None:
        keys[res.model_id] = bytes(res.key)

    res = split(mlp(), model_id="m", signing_key=pk, output_dir=tmp_path / "m.split",
                at=[["h2"]], split_points=["h2"], register=register, profile_repeats=1,
                batchable=True)  # fmt: skip
    tail = res.description["cuts"][0]["tail"]
    with Package.load(tmp_path / "m.split" / tail) as pkg:
        assert pkg.batchable is True
    res = split(mlp(), model_id="n", signing_key=pk, output_dir=tmp_path / "n.split",
                at=[["h2"]], split_points=["h2"], register=register, profile_repeats=1)  # fmt: skip
    with Package.load(tmp_path / "n.split" / res.description["cuts"][0]["tail"]) as pkg:
        assert pkg.batchable is False

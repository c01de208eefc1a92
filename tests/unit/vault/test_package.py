"""The sealed package format: round trip, tamper, truncation, wrong key and
version, foreign files, and what a sealed file must never contain."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.models import classifier_pipeline, mlp, reference_pipeline
from vault.core import crypto as _crypto
from vault.core.errors import FormatError, IntegrityError, UnsupportedVersionError
from vault.core.package import HEADER, SIG_SIZE, Package
from vault.sealing import seal


@pytest.fixture(scope="module")
def publisher() -> _crypto.PublisherKey:
    return _crypto.PublisherKey.generate()


def run_plaintext(pkg: Package, key: bytearray, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Decrypt and run the payload in-process, as the worker will."""
    with pkg.decrypt(key) as plain:
        values = dict(feeds)
        for graph in plain.graphs:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if plain.files:
                names = list(plain.files)
                so.add_external_initializers_from_files_in_memory(
                    names, [plain.files[n] for n in names], [len(plain.files[n]) for n in names]
                )
            sess = ort.InferenceSession(bytes(graph), so, providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            outs = sess.run(None, {n: values[n] for n in names})
            values.update({o.name: v for o, v in zip(sess.get_outputs(), outs)})
        return {o["name"]: values[o["name"]] for o in pkg.outputs}


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, publisher: _crypto.PublisherKey) -> Any:
    pre, model, post = classifier_pipeline()
    out = tmp_path_factory.mktemp("pkg") / "clf.vault"
    # a small chunk size so the payload has many chunks to reorder and cut
    result = seal(
        model, pre=pre, post=post, model_id="clf", signing_key=publisher, output=out,
        chunk_size=1024,
    )  # fmt: skip
    return result, (pre, model, post)


def test_round_trip_matches_plain_onnxruntime(sealed: Any, publisher: Any) -> None:
    result, stages = sealed
    pkg = Package.load(result.path)
    pkg.verify(publisher.public_raw)
    assert pkg.digest == result.digest
    assert pkg.manifest["composed"] is True
    feeds = {"image": np.random.default_rng(1).integers(0, 255, (4, 8), dtype=np.uint8)}
    got = run_plaintext(pkg, result.key, feeds)
    want = reference_pipeline(list(stages), feeds)
    assert set(got) == {"probs", "top_values", "top_indices"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_public_signature(sealed: Any) -> None:
    result, _ = sealed
    m = Package.load(result.path).manifest
    assert m["inputs"] == [{"name": "image", "dtype": "uint8", "shape": ["N", 8]}]
    assert [o["name"] for o in m["outputs"]] == ["probs", "top_values", "top_indices"]
    assert m["outputs"][2]["dtype"] == "int64"
    assert m["stages"] == ["pre", "model", "post"]
    assert m["publisher"]["fingerprint"].startswith("sha256:")


def test_every_single_flipped_byte_is_detected(sealed: Any, publisher: Any) -> None:
    result, _ = sealed
    data = Path(result.path).read_bytes()
    assert len(data) < 64 * 1024  # keeps the exhaustive sweep fast
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        if i < 8:
            expected: type[Exception] = FormatError
        elif i < 10:
            expected = UnsupportedVersionError
        else:
            expected = IntegrityError
        with pytest.raises(expected):
            Package.from_bytes(bad).verify(publisher.public_raw)


def test_flipped_payload_byte_fails_decryption_even_unsigned(sealed: Any) -> None:
    """The AEAD alone (without the signature) catches payload tampering."""
    result, _ = sealed
    data = bytearray(Path(result.path).read_bytes())
    pkg = Package.from_bytes(data)
    start = len(data) - SIG_SIZE - len(pkg.ciphertext)
    for offset in (0, 100, len(pkg.ciphertext) // 2, len(pkg.ciphertext) - 1):
        bad = bytearray(data)
        bad[start + offset] ^= 0x80
        with pytest.raises(IntegrityError):
            Package.from_bytes(bad).decrypt(result.key)


def test_chunk_reordering_is_detected(sealed: Any) -> None:
    result, _ = sealed
    data = bytearray(Path(result.path).read_bytes())
    pkg = Package.from_bytes(data)
    step = 1024 + 16
    start = len(data) - SIG_SIZE - len(pkg.ciphertext)
    assert len(pkg.ciphertext) > 3 * step
    a = bytes(data[start : start + step])
    b = bytes(data[start + step : start + 2 * step])
    data[start : start + step] = b
    data[start + step : start + 2 * step] = a
    with pytest.raises(IntegrityError):
        Package.from_bytes(data).decrypt(result.key)


def test_chunk_swap_between_packages_is_detected(tmp_path: Path, publisher: Any) -> None:
    key = _crypto.generate_key()
    a = seal(mlp(seed=1), model_id="a", signing_key=publisher, output=tmp_path / "a.vault",
             key=key, chunk_size=1024)  # fmt: skip
    b = seal(mlp(seed=2), model_id="a", signing_key=publisher, output=tmp_path / "b.vault",
             key=key, chunk_size=1024)  # fmt: skip
    da = bytearray(Path(a.path).read_bytes())
    db = Path(b.path).read_bytes()
    pa, pb = Package.from_bytes(da), Package.from_bytes(db)
    sa = len(da) - SIG_SIZE - len(pa.ciphertext)
    sb = len(db) - SIG_SIZE - len(pb.ciphertext)
    da[sa : sa + 1040] = db[sb : sb + 1040]  # same key, same position, other package
    with pytest.raises(IntegrityError):
        Package.from_bytes(da).decrypt(key)


def test_truncation_is_detected(sealed: Any, publisher: Any) -> None:
    result, _ = sealed
    data = Path(result.path).read_bytes()
    for cut in (len(data) - 1, len(data) - SIG_SIZE, len(data) - SIG_SIZE - 1040, 200, 17):
        with pytest.raises(IntegrityError):
            Package.from_bytes(data[:cut]).verify(publisher.public_raw)
    with pytest.raises(FormatError):
        Package.from_bytes(data[:10])


def test_dropping_the_last_chunk_is_detected(sealed: Any) -> None:
    """Even a forger who fixes every length field cannot drop the last chunk:
    the new last chunk was sealed without the last-chunk flag."""
    result, _ = sealed
    pkg = Package.load(result.path)
    p = pkg.manifest["payload"]
    n_full = p["plaintext_size"] // 1024
    ct = bytes(pkg.ciphertext)[: n_full * 1040]
    out = bytearray(n_full * 1024)
    from vault.core.package import payload_aad

    aad = payload_aad(bytes(Path(result.path).read_bytes()[: HEADER.size]), b"")
    with pytest.raises(IntegrityError):
        _crypto.stream_decrypt_into(result.key, bytes.fromhex(p["nonce_prefix"]), aad, ct, out,
                                    plaintext_size=len(out), chunk_size=1024)  # fmt: skip


def test_wrong_key_is_integrity_error(sealed: Any) -> None:
    result, _ = sealed
    with pytest.raises(IntegrityError):
        Package.load(result.path).decrypt(_crypto.generate_key())


def test_wrong_publisher_is_integrity_error(sealed: Any) -> None:
    result, _ = sealed
    other = _crypto.PublisherKey.generate()
    with pytest.raises(IntegrityError):
        Package.load(result.path).verify(other.public_raw)


def test_newer_version_is_refused_clearly(sealed: Any) -> None:
    result, _ = sealed
    data = bytearray(Path(result.path).read_bytes())
    struct.pack_into(">H", data, 8, 2)
    with pytest.raises(UnsupportedVersionError, match="version 2"):
        Package.from_bytes(data)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"hello world, not a package", b"\x08\x07" * 50],
)
def test_foreign_file_is_format_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "foreign.vault"
    path.write_bytes(content)
    with pytest.raises(FormatError, match="not a vault package"):
        Package.load(path)


def test_onnx_file_is_not_a_package(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    with pytest.raises(FormatError):
        Package.load(path)


def test_sealed_file_leaks_no_weight_window_and_no_names(tmp_path: Path, publisher: Any) -> None:
    model = mlp(n_features=16, hidden=128, seed=7)
    out = tmp_path / "leak.vault"
    seal(model, model_id="leak", signing_key=publisher, output=out)
    blob = out.read_bytes()
    for init in model.graph.initializer:
        raw = onnx.numpy_helper.to_array(init).tobytes()
        for i in range(0, max(1, len(raw) - 31)):
            assert raw[i : i + 32] not in blob, f"window of {init.name} at {i} found in clear"
        assert init.name.encode() not in blob
    for node in model.graph.node:
        assert node.name.encode() not in blob
        assert node.op_type.encode() not in blob
    assert b"secret" not in blob


def test_plaintext_wipe_overwrites_buffer(sealed: Any) -> None:
    result, _ = sealed
    plain = Package.load(result.path).decrypt(result.key)
    assert any(bytes(plain.graphs[0][:64]))
    plain.wipe()
    assert not any(bytes(plain.graphs[0]))
    assert all(not any(bytes(v)) for v in plain.files.values())
    plain.release()


def test_secret_holders_refuse_pickling() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(_crypto.PublisherKey.generate())
    with pytest.raises(TypeError):
        pickle.dumps(_crypto.EphemeralKey())
    assert "PRIVATE" not in repr(_crypto.PublisherKey.generate())


def test_empty_and_multi_chunk_stream_round_trip() -> None:
    key = _crypto.generate_key()
    prefix = os.urandom(7)
    for n in (0, 1, 1023, 1024, 1025, 5000):
        data = os.urandom(n)
        ct = _crypto.stream_encrypt(key, prefix, b"aad", data, chunk_size=1024)
        out = bytearray(n)
        _crypto.stream_decrypt_into(key, prefix, b"aad", ct, out, plaintext_size=n, chunk_size=1024)
        assert bytes(out) == data
        if n:
            with pytest.raises(IntegrityError):
                _crypto.stream_decrypt_into(key, prefix, b"other", ct, bytearray(n),
                                            plaintext_size=n, chunk_size=1024)  # fmt: skip


def test_a_clients_remembered_digest_names_only_the_package_it_was_computed_for(
    tmp_path: Path, publisher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client remembers a package's digest by its header, manifest and
    signature (vault/client.py), once an open with it succeeded: a later open
    reads no payload, a package sealed anew at the same path is hashed anew,
    a digest computed for an open that then failed is not remembered, and a
    payload changed under the same signature gets the old name but is
    refused by its worker's signature check, so the name never covers other
    bytes."""
    from vault import client as _client
    from vault.core import package as _package

    out = tmp_path / "m.vault"
    first = seal(mlp(), model_id="m", signing_key=publisher, output=out, chunk_size=1024)
    with Package.load(out) as pkg:
        digest, key = _client._package_digest(pkg)
    assert digest == first.digest
    assert key not in _client._DIGESTS  # computed, not yet remembered: no open succeeded
    _client._remember_digest(key, digest)  # what a successful open does
    real = _package.chunk_hashes_digest

    def no_hashing(*a: Any, **kw: Any) -> bytes:
        raise AssertionError("the payload was hashed again")

    monkeypatch.setattr(_package, "chunk_hashes_digest", no_hashing)
    with Package.load(out) as pkg:  # remembered: nothing hashed
        assert _client._package_digest(pkg)[0] == first.digest
        assert _client._DIGESTS[pkg.name_parts()] == first.digest
    with Package.load(out) as pkg, pytest.raises(AssertionError, match="hashed again"):
        _ = pkg.digest  # the control: a digest not remembered hashes the payload
    monkeypatch.setattr(_package, "chunk_hashes_digest", real)

    second = seal(mlp(), model_id="m", signing_key=publisher, output=out, chunk_size=1024)
    assert second.digest != first.digest
    with Package.load(out) as pkg:  # sealed anew: named anew
        digest, key = _client._package_digest(pkg)
    assert digest == second.digest and key not in _client._DIGESTS
    _client._remember_digest(key, digest)

    data = bytearray(out.read_bytes())
    data[len(data) - SIG_SIZE - 100] ^= 1  # one payload byte, header and signature kept
    out.write_bytes(bytes(data))
    with Package.load(out) as pkg:
        assert _client._package_digest(pkg)[0] == second.digest
        assert _client._DIGESTS[pkg.name_parts()] == second.digest
        with pytest.raises(IntegrityError):
            pkg.verify(publisher.public_pem())  # what its worker does before it serves
        assert pkg.digest != second.digest
    del _client._DIGESTS[key]

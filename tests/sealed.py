"""Seal test models and open them with a worker, for the worker and client tests.

The key-server-free path (:func:`vault.client.open_with_unsafe_test_key`) keeps
most worker tests to a fraction of a second each; the key-server path has its
own integration tests.

Example::

    with sealed_model(tmp_path, mlp()) as (model, pkg):
        model.compute({"x": arr})
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import onnx

from vault.client import Model, open_with_unsafe_test_key
from vault.core.crypto import PublisherKey
from vault.sealing import seal


@dataclass
class Sealed:
    path: str
    key: bytes
    publisher_pub: str
    manifest: dict[str, Any]


def seal_for_test(
    directory: str | os.PathLike[str],
    model: onnx.ModelProto,
    *,
    name: str = "model",
    pre: onnx.ModelProto | None = None,
    post: onnx.ModelProto | None = None,
    **kw: Any,
) -> Sealed:
    d = os.fspath(directory)
    pub = os.path.join(d, "publisher.pub")
    key_path = os.path.join(d, "publisher.key")
    if os.path.exists(key_path):
        pk = PublisherKey.load(key_path)
    else:
        pk = PublisherKey.generate()
        pk.save(key_path, pub)
    out = os.path.join(d, f"{name}.vault")
    res = seal(
        model, pre=pre, post=post, model_id=name.replace("/", "_"), signing_key=pk, output=out, **kw
    )
    return Sealed(out, bytes(res.key), pub, res.manifest)


def open_sealed(s: Sealed, **kw: Any) -> Model:
    return open_with_unsafe_test_key(s.path, key=s.key, publisher=s.publisher_pub, **kw)


@contextlib.contextmanager
def sealed_model(
    directory: str | os.PathLike[str], model: onnx.ModelProto, **kw: Any
) -> Iterator[tuple[Model, Sealed]]:
    s = seal_for_test(directory, model, **kw)
    m = open_sealed(s)
    try:
        yield m, s
    finally:
        m.close()


def seal_unchecked(
    directory: str | os.PathLike[str],
    model: onnx.ModelProto,
    *,
    name: str = "evil",
    files: list[tuple[str, bytearray]] | None = None,
) -> Sealed:
    """A validly signed package built by hand, as an attacker with a signing
    key (or a careless publisher's own tool) could: none of ``seal``'s checks
    run. The worker must refuse what ``seal`` would have refused."""
    import secrets

    from vault.core.crypto import generate_key
    from vault.core.package import build_plaintext, write_package
    from vault.sealing import _describe, _public_inputs

    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    pk = PublisherKey.generate()
    pub = os.path.join(d, "publisher.pub")
    pk.save(os.path.join(d, "publisher.key"), pub)
    manifest: dict[str, Any] = {
        "format": "vault-package/1",
        "model_id": name,
        "key_id": "k-" + secrets.token_hex(16),
        "publisher": {"alg": "ed25519", "fingerprint": pk.fingerprint},
        "created": "2026-01-01T00:00:00Z",
        "stages": ["model"],
        "composed": True,
        "inputs": [_describe(vi) for vi in _public_inputs(model)],
        "outputs": [_describe(vi) for vi in model.graph.output],
        "split_points": [],
    }
    key = generate_key()
    out = os.path.join(d, f"{name}.vault")
    plaintext = build_plaintext([("pipeline", model.SerializeToString())], list(files or []))
    write_package(out, manifest, plaintext, key, pk.sign, chunk_size=1 << 16)
    return Sealed(out, bytes(key), pub, manifest)


def forge_package(
    out: str | os.PathLike[str],
    genuine: str | os.PathLike[str],
    *,
    chunk_size: int,
    chunks: int,
    layout: str = "sparse",
) -> str:
    """A package file built by hand from a genuine one's manifest (its model
    id, key id and real publisher fingerprint), claiming ``chunks`` chunks of
    ``chunk_size`` bytes, with a signature of zeros. ``layout``: ``sparse``
    (the size is claimed and the file truncated to it: a few KiB on disk),
    ``dense`` (every byte written, random), or ``short`` (the header alone:
    claims the file cannot hold)."""
    import struct

    from vault.core import crypto as _crypto
    from vault.core.package import FORMAT_VERSION, HEADER, MAGIC, SIG_SIZE, canonical_json
    from vault.core.package import inspect as _inspect

    manifest = _inspect(genuine)
    plaintext = chunk_size * chunks
    manifest["payload"] = {
        **manifest["payload"],
        "chunk_size": chunk_size,
        "plaintext_size": plaintext,
        "ciphertext_size": _crypto.ciphertext_size(plaintext, chunk_size),
    }
    body = canonical_json(manifest)
    head = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body)) + body
    total = len(head) + manifest["payload"]["ciphertext_size"] + SIG_SIZE
    p = os.fspath(out)
    with open(p, "wb") as fh:
        fh.write(head)
        if layout == "sparse":
            fh.truncate(total - SIG_SIZE)
            fh.seek(total - SIG_SIZE)
            fh.write(b"\0" * SIG_SIZE)
        elif layout == "dense":
            left = total - len(head)
            while left:
                n = min(left, 1 << 20)
                fh.write(os.urandom(n))
                left -= n
        else:
            assert layout == "short", layout
    assert struct.unpack(">I", head[12:16])[0] == len(body)
    return p

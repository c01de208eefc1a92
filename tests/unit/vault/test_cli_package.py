"""``vault seal`` (air-gapped, with --key-out), ``vault inspect``, ``vault verify``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.models import classifier_pipeline
from vault.core import crypto as _crypto


def vault(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vault", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    pre, model, post = classifier_pipeline()
    onnx.save(pre, d / "pre.onnx")
    onnx.save(model, d / "model.onnx")
    onnx.save(post, d / "post.onnx")
    _crypto.PublisherKey.generate().save(d / "publisher.key", d / "publisher.pub")
    r = vault("seal", "model.onnx", "--pre", "pre.onnx", "--post", "post.onnx", "--model-id", "clf",
              "--signing-key", "publisher.key", "--key-out", "clf.key", "-o", "clf.vault", cwd=d)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "sealed clf -> clf.vault" in r.stdout
    return d


def test_key_out_is_private(workdir: Path) -> None:
    assert (workdir / "clf.key").stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex((workdir / "clf.key").read_text().strip())) == 32


def test_seal_without_key_destination_refuses(workdir: Path) -> None:
    r = vault("seal", "model.onnx", "--model-id", "x", "--signing-key", "publisher.key",
              "-o", "x.vault", cwd=workdir)  # fmt: skip
    assert r.returncode == 2
    assert "package key would be lost" in r.stderr
    assert not (workdir / "x.vault").exists()


def test_inspect_shows_signature_not_graph(workdir: Path) -> None:
    r = vault("inspect", "clf.vault", cwd=workdir)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in (
        "clf",
        "image",
        "uint8",
        "[N, 8]",
        "probs",
        "top_indices",
        "int64",
        "pre -> model -> post",
    ):
        assert needle in out
    for secret in ("secret", "MatMul", "Relu", "pre_scale", "h2", "logits"):
        assert secret not in out
    j = vault("inspect", "clf.vault", "--json", cwd=workdir)
    manifest = json.loads(j.stdout)
    assert manifest["model_id"] == "clf"
    assert [i["name"] for i in manifest["inputs"]] == ["image"]
    assert "secret" not in j.stdout


def test_verify_ok_and_bad(workdir: Path) -> None:
    r = vault("verify", "clf.vault", "--publisher", "publisher.pub", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK:")
    _crypto.PublisherKey.generate().save(workdir / "other.key", workdir / "other.pub")
    r = vault("verify", "clf.vault", "--publisher", "other.pub", cwd=workdir)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("vault: error[integrity]")
    assert "Traceback" not in r.stderr


def test_verify_under_another_publisher_key_says_so(workdir: Path) -> None:
    """A well-formed package checked under another publisher's key (ks2's
    publisher.pub for a package ks's key signed): before, the same opaque
    'package failed to authenticate or decrypt' as a tampered file; now it
    says plainly which key signed it and which was given. A package that
    names the key but whose signature fails stays the opaque error."""
    _crypto.PublisherKey.generate().save(workdir / "ks2.key", workdir / "ks2.pub")
    r = vault("verify", "clf.vault", "--publisher", "ks2.pub", cwd=workdir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    ours = _crypto.PublisherKey.load(workdir / "publisher.key").fingerprint
    theirs = _crypto.PublisherKey.load(workdir / "ks2.key").fingerprint
    assert "not signed by this publisher key" in r.stderr, r.stderr
    assert ours in r.stderr and theirs in r.stderr
    data = bytearray((workdir / "clf.vault").read_bytes())
    data[-1] ^= 1  # the signature's last byte
    (workdir / "tampered.vault").write_bytes(bytes(data))
    r = vault("verify", "tampered.vault", "--publisher", "publisher.pub", cwd=workdir)
    assert r.returncode == 2 and "package failed to authenticate or decrypt" in r.stderr


@pytest.mark.parametrize("command", ["seal", "split"])
def test_a_signing_key_the_licences_key_server_does_not_trust_is_refused(
    tmp_path: Path, command: str
) -> None:
    """`--licence ks2/admin.licence --signing-key ks/publisher.key` signed with
    ks's key and registered the package key with ks2: no licence ks2 issues
    could open it, and every open failed with a bare integrity error. Refused
    now, before anything is written or any key server is asked (none runs
    here), naming both keys; the matching key goes on to the key server."""
    from keyserver import init_dir

    _, model, _ = classifier_pipeline()
    onnx.save(model, tmp_path / "model.onnx")
    for d in ("ks", "ks2"):
        init_dir(tmp_path / d, address="tcp://127.0.0.1:9")  # nothing listens
    cut = ["--at", "h2", "--split-point", "h2"] if command == "split" else []
    base = [command, "model.onnx", "--model-id", "m", "--licence", "ks2/admin.licence", *cut]
    r = vault(*base, "--signing-key", "ks/publisher.key", "-o", "out", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "is not the publisher key the key server of ks2/admin.licence trusts" in r.stderr
    for d in ("ks", "ks2"):
        fp = _crypto.PublisherKey.load(tmp_path / d / "publisher.key").fingerprint
        assert fp in r.stderr
    assert not (tmp_path / "out").exists()
    # control: ks2's own key passes this check (and then meets the absent key server)
    r = vault(*base, "--signing-key", "ks2/publisher.key", "-o", "out", cwd=tmp_path)
    assert r.returncode != 0 and "is not the publisher key" not in r.stderr


def test_errors_are_one_line(workdir: Path) -> None:
    (workdir / "junk.vault").write_bytes(b"junk" * 10)
    r = vault("inspect", "junk.vault", cwd=workdir)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "error[format]" in r.stderr
    r = vault("seal", "model.onnx", "--model-id", "bad id!", "--signing-key", "publisher.key",
              "--key-out", "k", "-o", "y.vault", cwd=workdir)  # fmt: skip
    assert r.returncode == 2 and "error[seal]" in r.stderr


def test_public_api_names() -> None:
    import vault as v

    for name in (
        "open",
        "connect",
        "seal",
        "inspect",
        "Package",
        "Licence",
        "VaultError",
        "IntegrityError",
    ):
        assert name in v.__all__
    assert callable(v.seal) and callable(v.inspect)
    env = dict(os.environ)
    # importing vault must not pull onnx in (callers that only compute stay light)
    code = "import sys, vault; print('onnx' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.stdout.strip() == "False"


def test_deeply_nested_manifest_is_the_opaque_integrity_error(workdir: Path) -> None:
    import struct

    from vault.core.package import FORMAT_VERSION, MAGIC

    manifest = b"[" * 200_000 + b"]" * 200_000
    header = MAGIC + struct.pack(">HHI", FORMAT_VERSION, 0, len(manifest))
    (workdir / "deep.vault").write_bytes(header + manifest + b"\0" * 64)
    r = vault("inspect", "deep.vault", cwd=workdir)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr
    assert r.stderr.startswith("vault: error[integrity]") and r.stderr.count("\n") == 1

"""Devices and licence kinds at the key server: a key needs a runtime licence,
its holder's proof, and an enrolled device that the licence allows; every
device decision is audited."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from vault.core import crypto as _crypto
from vault.core.device import Device, init_device
from vault.core.errors import (
    ConfigError,
    IntegrityError,
    KeyServerUnavailableError,
    PermissionDeniedError,
    ProtocolError,
    UnknownLicenceError,
)
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence, LicenceProof
from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header

MODEL, KEY_ID, DIGEST = "m", "k1", "sha256:" + "cd" * 32
ARGS = {"model_id": MODEL, "key_id": KEY_ID, "package_digest": DIGEST}


@pytest.fixture
def model_key(keyserver: Any) -> bytearray:
    key = _crypto.generate_key()
    keyserver.register(MODEL, KEY_ID, key, DIGEST)
    return key


def _audit(keyserver: Any) -> list[tuple[str, str | None, str | None, dict[str, Any]]]:
    conn = sqlite3.connect(keyserver.dir / "keyserver.db")
    try:
        rows = conn.execute("SELECT event, actor, licence_id, detail FROM audit ORDER BY seq")
        return [(r[0], r[1], r[2], json.loads(r[3])) for r in rows.fetchall()]
    finally:
        conn.close()


def test_release_as_a_device_binds_the_device_into_the_sealed_key(keyserver, model_key):
    dev = keyserver.device()
    lic = keyserver.issue(MODEL)
    with keyserver.client(lic) as ks:
        rel = ks.release(**ARGS)
        assert rel.key == model_key
        assert ks.renew(lease_id=rel.lease.lease_id, calls=1).lease_id == rel.lease.lease_id
    # the lease is the device's: the licence's own key cannot renew it
    with KeyServerClient(lic) as ks, pytest.raises(Exception, match="unknown lease"):
        ks.renew(lease_id=rel.lease.lease_id, calls=0)
    released = [d for e, actor, lid, d in _audit(keyserver) if e == "released"]
    assert released[-1]["device_id"] == dev.device_id


def test_the_proof_must_be_the_holders_and_fresh(keyserver, model_key):
    dev = keyserver.device()
    lic = keyserver.issue(MODEL)
    other = keyserver.issue(MODEL, holder="mallory")
    with KeyServerClient(lic, device=dev) as ks:
        # another holder's proof key signing for this licence id
        forged = Licence.from_json({**other.to_json(), "licence_id": lic.licence_id})
        proof = forged.prove(device_id=dev.device_id, **ARGS)
        with pytest.raises(UnknownLicenceError, match="no such licence"):
            ks.release(**ARGS, proof=proof)
        # a proof for another device
        proof = lic.prove(device_id="dev-0000000000000000", **ARGS)
        with pytest.raises(UnknownLicenceError, match="no such licence"):
            ks.release(**ARGS, proof=proof)
        # a proof for another package
        proof = lic.prove(device_id=dev.device_id, model_id=MODEL, key_id=KEY_ID,
                          package_digest="sha256:" + "00" * 32)  # fmt: skip
        with pytest.raises(UnknownLicenceError, match="no such licence"):
            ks.release(**ARGS, proof=proof)
        # a stale one, and one used twice
        with pytest.raises(PermissionDeniedError, match="stale"):
            ks.release(
                **ARGS, proof=lic.prove(device_id=dev.device_id, now=time.time() - 600, **ARGS)
            )
        proof = lic.prove(device_id=dev.device_id, **ARGS)
        assert ks.release(**ARGS, proof=proof).key == model_key
        with pytest.raises(PermissionDeniedError, match="used before"):
            ks.release(**ARGS, proof=proof)
        # and none at all
        bare = Licence.from_json({**lic.to_json(), "proof_key": ""})
    with KeyServerClient(bare, device=dev) as ks:
        with pytest.raises(UnknownLicenceError, match="no such licence"):
            ks.release(**ARGS)
    # one answer for a bad proof and an unknown licence; the audit tells them apart
    denied = [d for e, a, lid, d in _audit(keyserver) if e == "denied"]
    assert sum(d.get("proof") == "bad" for d in denied) == 4, denied
    assert sum("proof" in d["message"] for d in denied) == 2, denied  # stale, used before


def test_licence_kinds_and_device_binding(keyserver, model_key, tmp_path):
    dev = keyserver.device()
    second = keyserver.enroll(tmp_path / "second")
    call = keyserver.issue(MODEL, holder="caller", kind="call")
    bound = keyserver.issue(MODEL, holder="bound", devices=[second.device_id])
    with keyserver.client(call) as ks, pytest.raises(PermissionDeniedError, match="call licence"):
        ks.release(**ARGS)
    with keyserver.client(bound) as ks, pytest.raises(PermissionDeniedError, match="not valid on"):
        ks.release(**ARGS)
    with KeyServerClient(bound, device=second) as ks:
        assert ks.release(**ARGS).key == model_key
    with pytest.raises(Exception, match="no enrolled device"):
        keyserver.issue(MODEL, holder="x", devices=["dev-ffffffffffffffff"])
    with keyserver.admin() as admin:
        rows = {r["licence_id"]: r for r in admin.list()}
    assert rows[call.licence_id]["kind"] == "call"
    assert rows[bound.licence_id]["devices"] == [second.device_id]
    assert dev.device_id != second.device_id


def test_a_device_may_not_administer_and_a_revoked_device_is_shut_out(keyserver, model_key):
    dev = keyserver.device()
    lic = keyserver.issue(MODEL)
    with keyserver.client(lic) as ks:
        rel = ks.release(**ARGS)
        with pytest.raises(PermissionDeniedError, match="device may only"):
            ks.issue(MODEL, holder="me")
    with keyserver.admin() as admin:
        [row] = [r for r in admin.list_devices() if r["device_id"] == dev.device_id]
        assert row["revoked"] is False and row["public_key"] == dev.public_key
        assert admin.revoke_device(dev.device_id)["already"] is False
        assert admin.revoke_device(dev.device_id)["already"] is True
        with pytest.raises(PermissionDeniedError, match="revoked"):
            admin.enroll_device(device_id=dev.device_id, public_key=dev.public_key)
    with KeyServerClient(lic, device=dev, timeout=1.5) as ks:
        with pytest.raises(KeyServerUnavailableError):  # refused at the handshake
            ks.renew(lease_id=rel.lease.lease_id, calls=0)
    events = [(e, d.get("device_id")) for e, a, lid, d in _audit(keyserver)]
    assert ("device_enrolled", dev.device_id) in events
    assert ("device_revoked", dev.device_id) in events


def test_enrolment_needs_an_admin_and_a_matching_id(keyserver, tmp_path):
    dev = init_device(tmp_path / "d")
    lic = keyserver.issue(MODEL)
    with KeyServerClient(lic) as ks, pytest.raises(PermissionDeniedError):
        ks.enroll_device(device_id=dev.device_id, public_key=dev.public_key)
    public, _ = zmq.curve_keypair()
    with keyserver.admin() as admin:
        with pytest.raises(ProtocolError, match="belong together"):
            admin.enroll_device(device_id=dev.device_id, public_key=public.decode())
        assert admin.enroll_device(device_id=dev.device_id, public_key=dev.public_key) is True
        assert admin.enroll_device(device_id=dev.device_id, public_key=dev.public_key) is False


def test_device_files_and_the_cli(keyserver, tmp_path):
    d = tmp_path / "dev"
    env = {**os.environ, "VAULT_DAEMON": ""}
    run = [sys.executable, "-m", "vault"]
    out = subprocess.run([*run, "device", "init", str(d)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    # no key server yet: a daemon on it would not start (nor would one on a
    # directory made before enrolment fixed the key server): it says what to run
    with pytest.raises(ConfigError, match=r"no key server recorded.*vault device enroll"):
        Device.load(d)
    dev = Device.load(d, require_keyserver=False)
    assert (d.stat().st_mode & 0o777, (d / "device.key").stat().st_mode & 0o777) == (0o700, 0o600)
    assert dev.secret_key not in repr(dev) and dev.secret_key not in (d / "device.pub").read_text()
    again = subprocess.run([*run, "device", "init", str(d)], capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    admin = str(keyserver.admin_licence)
    out = subprocess.run([*run, "device", "enroll", str(d), "--licence", admin],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and f"device {dev.device_id} enrolled" in out.stdout, out.stderr
    # enrolment fixed the device's key server: the admin licence's, not a caller's
    fixed = Device.load(d)
    assert (fixed.keyserver_address, fixed.keyserver_public_key) == (
        keyserver.address, keyserver.ready["server_key"])  # fmt: skip
    out = subprocess.run(
        [*run, "device", "list", "--licence", admin], capture_output=True, text=True
    )
    assert dev.device_id in out.stdout and "active" in out.stdout
    # an admin elsewhere enrolls from a copy of device.pub alone
    other = init_device(tmp_path / "other")
    copy = tmp_path / "other.pub"
    copy.write_bytes((tmp_path / "other" / "device.pub").read_bytes())
    out = subprocess.run([*run, "device", "enroll", str(copy), "--licence", admin],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and f"device {other.device_id} enrolled" in out.stdout, out.stderr
    assert "vault device keyserver" in out.stdout
    # ...and the device's owner fixes the key server from a licence of that vendor
    runtime = tmp_path / "alice.licence"
    keyserver.issue(MODEL).save(runtime)
    out = subprocess.run([*run, "device", "keyserver", str(tmp_path / "other"), "--licence",
                          str(runtime)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "recorded" in out.stdout, out.stderr
    assert Device.load(tmp_path / "other").keyserver_address == keyserver.address
    # made a worker service's device by enrolling it again, and listed as one
    out = subprocess.run([*run, "device", "enroll", str(copy), "--licence", admin, "--service"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "already enrolled; it is a worker service now" in out.stdout
    out = subprocess.run(
        [*run, "device", "list", "--licence", admin], capture_output=True, text=True
    )
    kinds = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()[1:]}
    assert kinds[other.device_id] == "service" and kinds[dev.device_id] == "daemon", out.stdout
    out = subprocess.run([*run, "device", "revoke", dev.device_id, "--licence", admin],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "revoked" in out.stdout
    out = subprocess.run(
        [*run, "device", "list", "--licence", admin], capture_output=True, text=True
    )
    assert "revoked" in out.stdout
    with pytest.raises(ConfigError, match="malformed"):
        Device.loads(b'{"format": "vault-device/1"}')


def test_raw_release_with_a_devices_key_still_needs_the_proof(keyserver, model_key):
    """The device's own key, by hand, without a caller's proof: refused."""
    dev = keyserver.device()
    lic = keyserver.issue(MODEL)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    try:
        s.curve_serverkey = lic.keyserver_public_key.encode()
        s.curve_publickey = dev.public_key.encode()
        s.curve_secretkey = dev.secret_key.encode()
        s.connect(keyserver.address)
        eph = _crypto.EphemeralKey()
        s.send(pack_header({"v": PROTOCOL_VERSION, "op": "release", "id": 1,
                            "nonce": os.urandom(16), "ts": time.time(), **ARGS,
                            "licence_id": lic.licence_id, "ephemeral_key": eph.public_bytes}))  # fmt: skip
        assert s.poll(5000)
        rep = unpack_header(s.recv())
        assert rep["ok"] is False and rep["error"]["code"] == "licence_unknown", rep
    finally:
        s.close(0)
        ctx.term()
    proof = LicenceProof.from_wire(lic.prove(device_id=dev.device_id, **ARGS).to_wire())
    assert proof.device_id == dev.device_id  # the wire form round-trips


def test_hpke_info_binds_the_device() -> None:
    a = _crypto.key_release_info("m", "d", "lic-1", "dev-a")
    assert a != _crypto.key_release_info("m", "d", "lic-1", "dev-b")
    assert a != _crypto.key_release_info("m", "d", "lic-1")
    for info, ok in ((a, True), (_crypto.key_release_info("m", "d", "lic-1", "dev-b"), False)):
        eph = _crypto.EphemeralKey()
        sealed = _crypto.hpke_seal("x25519", eph.public_bytes, b"k" * 32, a)
        if ok:
            assert eph.open(sealed, info) == bytearray(b"k" * 32)
        else:  # sealed for device a, opened as device b
            with pytest.raises(IntegrityError):
                eph.open(sealed, info)


def test_vault_open_without_a_daemon_says_what_to_do(
    keyserver, tmp_path: Path, monkeypatch
) -> None:
    import vault
    from vault.core import daemonwire

    # the default socket path points nowhere here, whatever this machine runs
    # (vault.core.daemonwire.daemon_socket reads it for the client and vault.open)
    monkeypatch.setattr(daemonwire, "DEFAULT_SOCKET", str(tmp_path / "default.sock"))

    lic = keyserver.issue(MODEL)
    call = keyserver.issue(MODEL, holder="c", kind="call")
    missing = str(tmp_path / "no-daemon.sock")
    old = os.environ.pop("VAULT_DAEMON", None)
    try:
        with pytest.raises(ConfigError, match="vault daemon.*--same-user"):
            vault.open(tmp_path / "x.vault", licence=lic)
        with pytest.raises(ConfigError, match="call licence"):
            vault.open(tmp_path / "x.vault", licence=call)
        with pytest.raises(ConfigError, match="cannot reach the vault daemon"):
            vault.open(tmp_path / "x.vault", licence=lic, daemon=missing)
    finally:
        if old is not None:
            os.environ["VAULT_DAEMON"] = old


def test_a_device_row_written_into_the_database_is_refused(keyserver, model_key, tmp_path):
    """An insider with write access to the database inserts a device of their
    own: its row has no valid tag, so it gets no handshake and no key."""
    lic = keyserver.issue(MODEL)
    forged = init_device(tmp_path / "forged")
    forged.keyserver_address, forged.keyserver_public_key = (
        keyserver.address, keyserver.ready["server_key"])  # fmt: skip
    conn = sqlite3.connect(keyserver.dir / "keyserver.db")
    try:
        conn.execute(
            "INSERT INTO devices (device_id, public_key, name, enrolled_at, enrolled_by,"
            " revoked_at, mac) VALUES (?, ?, 'insider', ?, 'me', NULL, ?)",
            (forged.device_id, forged.public_key, time.time(), b"\0" * 32),
        )
        conn.commit()
    finally:
        conn.close()
    with KeyServerClient(lic, device=forged, timeout=1.5) as ks:
        with pytest.raises(KeyServerUnavailableError):
            ks.release(**ARGS)
    with keyserver.admin() as admin:
        rows = {r["device_id"]: r for r in admin.list_devices()}
    assert rows[forged.device_id]["authentic"] is False
    assert keyserver.events("row_refused", table="devices", device=forged.device_id)
    # control: the same kind of device, enrolled by the admin, gets its key
    with keyserver.client(lic) as ks:
        assert ks.release(**ARGS).key == model_key
    assert rows.get(keyserver.device().device_id, {"authentic": True})["authentic"] is True

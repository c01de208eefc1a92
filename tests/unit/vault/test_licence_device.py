"""Licence proofs, device identities and the daemon's wire format, in process."""

from __future__ import annotations

import base64
import os
import pickle
import socket
import struct
from pathlib import Path

import pytest
import zmq

from vault.core import crypto as _crypto
from vault.core.daemonwire import MAX_MESSAGE, recv_message, send_message
from vault.core.device import Device, device_id_for, init_device, record_keyserver
from vault.core.errors import ConfigError, IntegrityError, ProtocolError
from vault.core.licence import Licence, LicenceProof


def _licence(**kw: object) -> Licence:
    pub, sec = zmq.curve_keypair()
    proof = _crypto.PublisherKey.generate()
    return Licence(
        licence_id="lic-1", holder="alice", keyserver_address="tcp://127.0.0.1:1",
        keyserver_public_key="S" * 40, client_public_key=pub.decode(),
        client_secret_key=sec.decode(), model_id="m",
        proof_key=base64.b64encode(proof.export_private_raw()).decode(), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_proof_verifies_only_for_its_request() -> None:
    lic = _licence()
    ctx = {"model_id": "m", "key_id": "k", "package_digest": "d"}
    proof = LicenceProof.from_wire(lic.prove(device_id="dev-1", **ctx).to_wire())
    public = base64.b64decode(lic.proof_public_key)

    def msg(**over: object) -> bytes:
        fields = {"licence_id": "lic-1", "device_id": "dev-1", **ctx, "nonce": proof.nonce,
                  "ts": proof.ts, **over}  # fmt: skip
        return _crypto.licence_proof_message(**fields)  # type: ignore[arg-type]

    _crypto.verify_signature(public, proof.signature, msg())
    for over in ({"device_id": "dev-2"}, {"licence_id": "lic-2"}, {"package_digest": "e"},
                 {"nonce": b"x" * 16}, {"ts": proof.ts + 1},
                 {"client_key": "K" * 40}):  # fmt: skip
        with pytest.raises(IntegrityError):
            _crypto.verify_signature(public, proof.signature, msg(**over))
    # bound to the CURVE key of the caller the worker will answer: a relay's own
    # key in its place does not verify
    mine, relay = zmq.curve_keypair()[0].decode(), zmq.curve_keypair()[0].decode()
    bound = lic.prove(device_id="dev-1", client_key=mine, **ctx)
    fields = {"licence_id": "lic-1", "device_id": "dev-1", **ctx, "nonce": bound.nonce,
              "ts": bound.ts}  # fmt: skip
    _crypto.verify_signature(public, bound.signature,
                             _crypto.licence_proof_message(**fields, client_key=mine))  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(IntegrityError):
        _crypto.verify_signature(public, bound.signature,
                                 _crypto.licence_proof_message(**fields, client_key=relay))  # type: ignore[arg-type]  # fmt: skip


def test_the_public_copy_holds_no_secret_and_kinds_are_checked() -> None:
    lic = _licence(same_user=True, devices=("dev-1",))
    pub = lic.public_copy()
    data = pub.dumps()
    assert lic.client_secret_key.encode() not in data and lic.proof_key.encode() not in data
    assert pub.same_user and pub.devices == ("dev-1",) and pub.kind == "runtime"
    with pytest.raises(ConfigError, match="no proof key"):
        pub.prove(device_id="d", model_id="m", key_id="k", package_digest="d")
    assert lic.client_secret_key not in repr(lic) and lic.proof_key not in repr(lic)
    with pytest.raises(TypeError):
        pickle.dumps(lic)
    with pytest.raises(ConfigError, match="unknown licence kind"):
        _licence(kind="god")
    admin = Licence.from_json({**lic.to_json(), "role": "admin", "kind": ""})
    assert admin.kind == "admin"  # older files: the kind follows the role


def test_device_files(tmp_path) -> None:
    dev = init_device(tmp_path / "d")
    assert dev.device_id == device_id_for(dev.public_key)
    # a device directory without its key server (as every one made before the
    # key server was fixed at enrolment) is refused with what to run
    with pytest.raises(ConfigError, match=r"no key server recorded.*vault device enroll"):
        Device.load(tmp_path / "d")
    server = zmq.curve_keypair()[0].decode()
    record_keyserver(tmp_path / "d", address="tcp://127.0.0.1:7700", public_key=server)
    loaded = Device.load(tmp_path / "d")
    assert loaded.secret_key == dev.secret_key
    assert (loaded.keyserver_address, loaded.keyserver_public_key) == (
        "tcp://127.0.0.1:7700", server)  # fmt: skip
    # what a worker is handed on its pipe carries the key server with the keys
    again = Device.loads(loaded.dumps())
    assert again.keyserver_public_key == server
    with pytest.raises(ConfigError, match="key server address"):
        record_keyserver(tmp_path / "d", address="http://x", public_key=server)
    assert Device.load_public(tmp_path / "d") == {"device_id": dev.device_id,
                                                  "public_key": dev.public_key}  # fmt: skip
    assert dev.secret_key not in repr(dev)
    with pytest.raises(TypeError):
        pickle.dumps(dev)
    wrong = dev.dumps().replace(dev.device_id.encode(), b"dev-0000000000000000")
    with pytest.raises(ConfigError, match="does not match"):
        Device.loads(wrong)
    with pytest.raises(ConfigError, match="no device key"):
        Device.load(tmp_path / "missing")


def test_daemon_messages_carry_descriptors_and_refuse_garbage(tmp_path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    f = tmp_path / "pkg"
    f.write_bytes(b"package bytes")
    fd = os.open(f, os.O_RDONLY)
    try:
        send_message(a, {"op": "open", "n": 1}, [fd])
        msg, fds = recv_message(b)
        assert msg == {"op": "open", "n": 1} and len(fds) == 1
        assert os.read(fds[0], 100) == b"package bytes"  # the same open file
        os.close(fds[0])
        a.sendall(struct.pack(">I", 5) + b"[1,2]")
        with pytest.raises(ProtocolError, match="malformed"):
            recv_message(b)
        a.sendall(struct.pack(">I", MAX_MESSAGE + 1))
        with pytest.raises(ProtocolError, match="too large"):
            recv_message(b)
        a.close()
        with pytest.raises(ConnectionError):
            recv_message(b)
    finally:
        os.close(fd)
        b.close()


def test_a_private_file_written_to_a_device_or_pipe_leaves_it_one(tmp_path: Path) -> None:
    """`-o /dev/stdout` (a link to the process's descriptor) was renamed over:
    run as root, it replaced the system's /dev/stdout link with a 0600 file
    holding the token. A path that is not a file is written to as it is; a
    file is still replaced atomically with mode 0600 (the control)."""
    import stat as st_
    import threading

    from vault.core.files import write_private_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"
    link.symlink_to(fifo)  # as /dev/stdout -> /proc/self/fd/1
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_private_file(link, b"token")
    reader.join(10)
    assert got == [b"token"]
    assert link.is_symlink() and st_.S_ISFIFO(os.stat(fifo).st_mode)
    write_private_file("/dev/null", b"x")
    assert st_.S_ISCHR(os.stat("/dev/null").st_mode)
    plain = tmp_path / "plain"
    plain.write_bytes(b"old")
    plain.chmod(0o644)
    write_private_file(plain, b"new")
    assert plain.read_bytes() == b"new" and st_.S_IMODE(plain.stat().st_mode) == 0o600
    with pytest.raises(IsADirectoryError):
        write_private_file(tmp_path, b"x")
    # a pipe another user planted where the secret was to go: refused, nothing written
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        os.mkfifo(theirs)
        os.chown(theirs, 65534, 65534)
        heard: list[bytes] = []
        reader = threading.Thread(target=lambda: heard.append(theirs.read_bytes()))
        reader.start()
        with pytest.raises(ConfigError, match="of another user"):
            write_private_file(theirs, b"token")
        reader.join(10)
        assert heard == [b""]

"""End to end against a real key server process over real CURVE sockets."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import msgpack
import pytest
import zmq

from vault.core import crypto as _crypto
from vault.core.errors import (
    AuditError,
    DigestMismatchError,
    KeyServerError,
    KeyServerUnavailableError,
    LicenceError,
    LicenceExpiredError,
    LicenceRevokedError,
    PermissionDeniedError,
    QuotaExhaustedError,
    RateLimitedError,
    UnknownLicenceError,
    WrongModelError,
)
from vault.core.keyclient import KeyServerClient
from vault.core.licence import Licence
from vault.core.protocol import PROTOCOL_VERSION, pack_header, unpack_header

MODEL, KEY_ID, DIGEST = "resnet", "k1", "sha256:" + "ab" * 32


@pytest.fixture
def model_key(keyserver: Any) -> bytearray:
    key = _crypto.generate_key()
    keyserver.register(MODEL, KEY_ID, key, DIGEST)
    return key


def _release(keyserver: Any, lic: Licence, **kw: Any) -> Any:
    """A key release as the key server's enrolled test device, with ``lic``'s proof."""
    args = {"model_id": MODEL, "key_id": KEY_ID, "package_digest": DIGEST, **kw}
    with keyserver.client(lic, timeout=5) as ks:
        return ks.release(**args)


def _audit_events(keyserver: Any) -> list[tuple[str, str | None, str]]:
    conn = sqlite3.connect(keyserver.dir / "keyserver.db")
    try:
        return [
            (r[0], r[1], r[2])
            for r in conn.execute("SELECT event, licence_id, detail FROM audit ORDER BY seq")
        ]
    finally:
        conn.close()


# --- the happy path ------------------------------------------------------------


@pytest.mark.parametrize("suite", ["x25519", "mlkem768-x25519"])
def test_release_returns_the_registered_key_and_a_lease(keyserver, model_key, suite):
    lic = keyserver.issue(MODEL, max_calls=100)
    assert lic.keyserver_address == keyserver.address
    before = time.time()
    rel = _release(keyserver, lic, suite=suite)
    assert rel.key == model_key and len(rel.key) == 32
    assert rel.lease.ttl == 2.0
    assert before + 1.5 < rel.lease.expires_at <= time.time() + 2.0
    assert rel.lease.hard_end == rel.lease.expires_at  # grace 0
    assert rel.lease.call_budget == 100
    assert "hidden" in repr(rel) and model_key.hex() not in repr(rel)
    rel.wipe()
    assert rel.key == bytearray(32)


def test_renew_reports_usage_and_extends_the_lease(keyserver, model_key):
    lic = keyserver.issue(MODEL, max_calls=10, grace=5.0)
    rel = _release(keyserver, lic)
    assert rel.lease.hard_end == pytest.approx(rel.lease.expires_at + 5.0)
    with keyserver.client(lic) as ks:
        lease = ks.renew(lease_id=rel.lease.lease_id, calls=4)
    assert lease.lease_id == rel.lease.lease_id and lease.call_budget == 6
    with keyserver.admin() as admin:
        [row] = [r for r in admin.list() if r["licence_id"] == lic.licence_id]
    assert row["used_calls"] == 4
    events = [e for e, lid, _ in _audit_events(keyserver) if lid == lic.licence_id]
    assert events == ["issued", "released", "usage", "renewed"]


def test_newly_issued_licence_connects_without_restart_and_list_revoke(keyserver, model_key):
    with keyserver.admin() as admin:
        lic = admin.issue(MODEL, holder="bob", expires=3600, rate_limit=50)
        rows = {r["licence_id"]: r for r in admin.list()}
        assert rows[lic.licence_id]["holder"] == "bob"
        assert rows[lic.licence_id]["expires_at"] > time.time() + 3500
        assert any(r["role"] == "admin" for r in rows.values())
    assert _release(keyserver, lic).key == model_key
    with keyserver.admin() as admin:
        assert admin.revoke(lic.licence_id)["already"] is False
        assert admin.revoke(lic.licence_id)["already"] is True


# --- every denial, end to end ----------------------------------------------------


def test_revoked_licence_is_denied_on_release_and_ends_the_lease(keyserver, model_key):
    lic = keyserver.issue(MODEL)
    rel = _release(keyserver, lic)
    with keyserver.admin() as admin:
        admin.revoke(lic.licence_id)
    with pytest.raises(LicenceRevokedError):
        _release(keyserver, lic)  # still admitted by ZAP: it hears *why*
    with keyserver.client(lic) as ks, pytest.raises(LicenceRevokedError):
        ks.renew(lease_id=rel.lease.lease_id, calls=1)


def test_expired_licence_is_denied(keyserver, model_key):
    """The error crosses the wire typed (the timing itself is unit-tested on
    the service's clock: tests/unit/keyserver/test_service.py)."""
    lic = keyserver.issue(MODEL, expires=0)  # issued to expire at once
    with pytest.raises(LicenceExpiredError):
        _release(keyserver, lic)


def test_quota_is_enforced_through_renewals(keyserver, model_key):
    lic = keyserver.issue(MODEL, max_calls=3)
    rel = _release(keyserver, lic)
    assert rel.lease.call_budget == 3
    with keyserver.client(lic) as ks:
        with pytest.raises(QuotaExhaustedError):
            ks.renew(lease_id=rel.lease.lease_id, calls=3)
        with pytest.raises(QuotaExhaustedError):  # the lease stays ended, for the same reason
            ks.renew(lease_id=rel.lease.lease_id, calls=0)
    with pytest.raises(QuotaExhaustedError):
        _release(keyserver, lic)


def test_rate_limit_slows_key_request_sweeps(keyserver, model_key):
    """A grant counts against the rate, end to end (refill timing: unit-tested
    on the service's clock)."""
    lic = keyserver.issue(MODEL, rate_limit=2)  # 2 calls/s; bucket 2/s x 2 s lease = 4 calls
    with keyserver.client(lic) as ks:
        args = {"model_id": MODEL, "key_id": KEY_ID, "package_digest": DIGEST}
        rel = ks.release(**args)
        assert rel.key == model_key and rel.lease.call_budget == 4  # the whole bucket
        with pytest.raises(RateLimitedError):
            ks.release(**args)  # nothing left
        # a renewal gives the calls its lease did not serve back to the bucket
        # (3 of 4) and draws its own budget from it
        lease = ks.renew(lease_id=rel.lease.lease_id, calls=1)
        assert lease.call_budget == 3 and lease.rate == 2 and lease.burst == 2
        # all served: budget 0, and when to come back
        lease = ks.renew(lease_id=rel.lease.lease_id, calls=3)
        assert lease.call_budget == 0 and 0 < lease.retry_after <= 0.5


def test_wrong_model_wrong_digest_unknown_key_unknown_licence(keyserver, model_key):
    keyserver.register("other", KEY_ID, _crypto.generate_key(), DIGEST)
    lic = keyserver.issue(MODEL)
    with pytest.raises(WrongModelError):
        _release(keyserver, lic, model_id="other")
    with pytest.raises(DigestMismatchError):
        _release(keyserver, lic, package_digest="sha256:" + "00" * 32)
    with pytest.raises(KeyServerError, match="no key"):
        _release(keyserver, lic, key_id="nope")
    with keyserver.client(lic) as ks:
        with pytest.raises(LicenceError, match="unknown lease"):
            ks.renew(lease_id="0" * 24, calls=1)
    forged = Licence.from_json({**lic.to_json(), "licence_id": "lic-doesnotexist"})
    with pytest.raises(UnknownLicenceError) as unknown:
        _release(keyserver, forged)
    other = keyserver.issue(MODEL, holder="mallory")
    stolen_id = Licence.from_json({**lic.to_json(), "licence_id": other.licence_id})
    with pytest.raises(UnknownLicenceError) as somebody_elses:
        _release(keyserver, stolen_id)  # bob's key cannot use mallory's licence id
    # one answer for both: the reply does not tell which licence ids exist
    assert unknown.value.to_wire() == somebody_elses.value.to_wire()
    assert "lic-" not in str(unknown.value)
    reasons = [d for e, lid, d in _audit_events(keyserver) if e == "denied"]
    for code in ("wrong_model", "digest_mismatch", "keyserver", "licence_unknown"):
        assert any(f'"reason":"{code}"' in d for d in reasons), code
    # the audit, unlike the reply, says which id was asked for
    assert any(other.licence_id in d for d in reasons)


def test_admin_operations_need_an_admin_licence(keyserver, model_key):
    lic = keyserver.issue(MODEL)
    with KeyServerClient(lic) as ks:
        with pytest.raises(PermissionDeniedError):
            ks.issue(MODEL, holder="me-again")
        with pytest.raises(PermissionDeniedError):
            ks.revoke(lic.licence_id)
        with pytest.raises(PermissionDeniedError):
            ks.list()
        with pytest.raises(PermissionDeniedError):
            ks.register_key(model_id=MODEL, key_id="k9", key=bytes(32), package_digest=DIGEST)
    with keyserver.admin() as admin:
        # an admin licence is for no model, and gives no key
        with pytest.raises(PermissionDeniedError, match="admin licence gives no key"):
            admin.release(model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST)
        with pytest.raises(KeyServerError, match="already registered"):
            admin.register_key(model_id=MODEL, key_id=KEY_ID, key=bytes(32), package_digest=DIGEST)
        assert (
            admin.register_key(model_id=MODEL, key_id=KEY_ID, key=model_key, package_digest=DIGEST)
            is False
        )  # idempotent


def test_a_key_for_a_package_signed_by_another_publisher_is_refused(keyserver):
    """A package signed with another key server's publisher.key could never be
    opened under this key server's licences (every worker checks the signature
    against the publisher key they carry): registering its key is refused,
    naming both fingerprints, and nothing is stored; this key server's own
    publisher key is accepted."""
    from vault.core.crypto import PublisherKey

    other = PublisherKey.generate().fingerprint
    ours = PublisherKey.load(keyserver.admin_licence.parent / "publisher.key").fingerprint
    with keyserver.admin() as admin:
        with pytest.raises(KeyServerError, match="signed by publisher key") as info:
            admin.register_key(model_id="mixed", key_id="k-mixed", key=bytes(32),
                               package_digest=DIGEST, publisher=other)  # fmt: skip
        assert other in str(info.value) and ours in str(info.value)
        assert admin.register_key(model_id="mixed", key_id="k-mixed", key=bytes(range(32)),
                                  package_digest=DIGEST, publisher=ours) is True  # fmt: skip


# --- the handshake ------------------------------------------------------------------


def _raw_socket(ctx: zmq.Context[Any], address: str, lic: Licence | None) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if lic is not None:
        s.curve_serverkey = lic.keyserver_public_key.encode()
        s.curve_publickey = lic.client_public_key.encode()
        s.curve_secretkey = lic.client_secret_key.encode()
    s.connect(address)
    return s


def _ping_header(**extra: Any) -> bytes:
    return pack_header({"v": PROTOCOL_VERSION, "op": "ping", "id": 1, **extra})


def test_no_answer_from_the_key_server_says_what_is_wrong_with_its_address(keyserver) -> None:
    """ZeroMQ tells a wrong address from a stopped or silent server in no way:
    each was "no answer from key server ... within 10s". Now the error says
    which: nothing listening on the port, a port that takes connections and
    says nothing (another service, or a key server whose key is not the
    licence's), a host name that does not resolve; the real key server still
    answers (the control)."""
    import socket
    import threading

    admin = Licence.load(keyserver.admin_licence)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens once it is closed
    with KeyServerClient(admin, timeout=0.5, address=f"tcp://127.0.0.1:{port}") as ks, \
            pytest.raises(KeyServerUnavailableError, match="nothing listens on 127.0.0.1 port"):  # fmt: skip
        ks.ping()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                return

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        addr = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        with KeyServerClient(admin, timeout=0.5, address=addr) as ks, \
                pytest.raises(KeyServerUnavailableError, match="takes connections but did not"):  # fmt: skip
            ks.ping()
    finally:
        stop.set()
        silent.shutdown(socket.SHUT_RDWR)  # wakes the accept
        silent.close()
        acceptor.join(10)  # before the accepted ones are closed: none comes after
        for c in held:
            c.close()
    # a name no resolver knows (RFC 6761: .invalid never resolves; a resolver
    # that cannot be reached says so too)
    with KeyServerClient(admin, timeout=0.5, address="tcp://vault-keyserver.invalid:7700") as ks, \
            pytest.raises(KeyServerUnavailableError, match="does not resolve here"):  # fmt: skip
        ks.ping()
    with KeyServerClient(admin, timeout=10) as ks:
        ks.ping()


def test_unknown_curve_key_and_null_client_are_refused_at_the_handshake(keyserver):
    admin = Licence.load(keyserver.admin_licence)
    public, secret = zmq.curve_keypair()
    stranger = Licence.from_json(
        {
            **admin.to_json(),
            "client": {"public_key": public.decode(), "secret_key": secret.decode()},
        }
    )
    with KeyServerClient(stranger, timeout=1.0) as ks, pytest.raises(KeyServerUnavailableError):
        ks.ping()
    ctx = zmq.Context()
    try:
        null = _raw_socket(ctx, keyserver.address, None)
        null.send(_ping_header())
        assert null.poll(1000) == 0  # no reply: NULL never completes a CURVE handshake
        null.close(0)
        good = _raw_socket(ctx, keyserver.address, admin)
        good.send(_ping_header())
        assert good.poll(5000)
        assert unpack_header(good.recv())["ok"] is True
        good.close(0)
    finally:
        ctx.term()


# --- bad input never kills the server ------------------------------------------------


def test_malformed_oversized_unknown_and_replayed_requests_get_errors(keyserver, model_key):
    lic = keyserver.issue(MODEL, same_user=True)  # tier 0: its own key may ask (raw requests)
    ctx = zmq.Context()
    try:
        s = _raw_socket(ctx, keyserver.address, lic)

        def ask(*frames: bytes) -> dict[str, Any]:
            s.send_multipart(list(frames))
            assert s.poll(5000), "no reply"
            return unpack_header(s.recv())

        def base(op: str = "release", **kw: Any) -> dict[str, Any]:
            return {"v": PROTOCOL_VERSION, "op": op, "id": 7, "nonce": os.urandom(16),
                    "ts": time.time(), **kw}  # fmt: skip

        assert ask(b"\xc1garbage")["error"]["code"] == "protocol"
        assert ask(msgpack.packb([1, 2, 3]))["error"]["code"] == "protocol"
        assert ask(b"a", b"b")["error"]["code"] == "protocol"
        assert ask(pack_header({**base(), "v": 99}))["error"]["code"] == "unsupported_version"
        assert ask(pack_header(base("steal_keys")))["error"]["code"] == "protocol"
        assert ask(pack_header(base("release", model_id=5)))["error"]["code"] == "protocol"
        no_nonce = {"v": PROTOCOL_VERSION, "op": "list", "id": 1}
        assert ask(pack_header(no_nonce))["error"]["code"] == "protocol"
        stale = base("release", ts=time.time() - 3600)
        assert "window" in ask(pack_header(stale))["error"]["message"]
        bad_eph = base("release", model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST,
                       licence_id=lic.licence_id, ephemeral_key=b"short")  # fmt: skip
        assert ask(pack_header(bad_eph))["error"]["code"] == "protocol"
        big = pack_header(base("ping", pad=b"x" * (100 * 1024)))
        assert "too large" in ask(big)["error"]["message"]

        eph = _crypto.EphemeralKey()
        good = pack_header(
            base("release", model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST,
                 licence_id=lic.licence_id, ephemeral_key=eph.public_bytes)
        )  # fmt: skip
        assert ask(good)["ok"] is True
        replay = ask(good)
        assert replay["ok"] is False and "replayed" in replay["error"]["message"]

        # Over ZMQ_MAXMSGSIZE: libzmq drops the connection, no reply is possible.
        s.send(b"x" * (512 * 1024))
        assert s.poll(500) == 0
        s.close(0)
    finally:
        ctx.term()
    assert keyserver.proc.poll() is None
    assert _release(keyserver, lic).key == model_key  # still serving


# --- fail closed and secrets -----------------------------------------------------------


def test_audit_write_failure_releases_nothing(keyserver, model_key):
    lic = keyserver.issue(MODEL)
    keyserver.device()  # enrolled while the audit log still takes records
    conn = sqlite3.connect(keyserver.dir / "keyserver.db")
    try:
        conn.execute(
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
        conn.commit()
        with pytest.raises(AuditError):
            _release(keyserver, lic)
        with pytest.raises(AuditError):  # a denial that cannot be audited is an audit error
            _release(keyserver, lic, model_id="other")
        with keyserver.admin() as admin, pytest.raises(AuditError):
            admin.issue(MODEL, holder="nobody")
        n_leases = conn.execute("SELECT count(*) FROM leases").fetchone()[0]
        assert n_leases == 0  # the lease was rolled back with its audit record
        conn.execute("DROP TRIGGER audit_down")
        conn.commit()
    finally:
        conn.close()
    assert _release(keyserver, lic).key == model_key
    assert keyserver.proc.poll() is None


def test_package_key_never_in_clear_in_db_logs_or_errors(keyserver, model_key):
    lic = keyserver.issue(MODEL)
    errors = []
    for suite in ("x25519", "mlkem768-x25519"):
        rel = _release(keyserver, lic, suite=suite)
        assert rel.key == model_key
        errors.append(repr(rel))
    for kw in ({"model_id": "nope"}, {"package_digest": "x"}, {"key_id": "k0"}):
        with pytest.raises(LicenceError if "key_id" not in kw else KeyServerError) as ei:
            _release(keyserver, lic, **kw)
        errors.append(str(ei.value) + repr(ei.value))
    with keyserver.admin() as admin, pytest.raises(KeyServerError) as ei:
        admin.register_key(model_id=MODEL, key_id=KEY_ID, key=bytes(32), package_digest=DIGEST)
    errors.append(str(ei.value))
    keyserver.stop()
    needles = [bytes(model_key), model_key.hex().encode(), model_key.hex().upper().encode()]
    import base64

    needles.append(base64.b64encode(bytes(model_key))[:40])
    haystacks = {"log": keyserver.output(), "errors": "\n".join(errors).encode()}
    for name in os.listdir(keyserver.dir):
        if name.startswith("keyserver.db"):
            haystacks[name] = (keyserver.dir / name).read_bytes()
    assert haystacks["keyserver.db"]
    for where, data in haystacks.items():
        for needle in needles:
            assert needle not in data, f"package key in the clear in {where}"

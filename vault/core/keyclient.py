"""Client of the licensing key server (used by the worker and the CLI).

A DEALER socket with CURVE: the licence file supplies the server's public key
and, for admin work, the client's key pair, so the connection itself proves
who is asking. A key release is made *as a device* (``device=``: the
connection uses the device's key pair, which only the trusted runtime can
read) and carries the caller's proof of the licence (a signature with the
licence's proof key, made by the caller's side and passed through). As a
device, the client dials the key server the device was enrolled with
(:attr:`Device.keyserver_address`), never the one a licence names: a licence
naming another key server is a :class:`~vault.core.errors.WrongKeyServerError`
before anything is sent.
Each request carries a fresh random nonce and a timestamp (the server refuses
replays) and an id; replies are matched by id. On a timeout the socket is
thrown away (``linger=0``), so a late request is never delivered later.

Thread safety: one client may be shared by threads; requests are serialised
by a lock (ZeroMQ sockets are not thread-safe). For parallel requests give
each thread its own client.

Example::

    with KeyServerClient(licence, device=Device.load("/var/lib/vault/device")) as ks:
        ks.authorize(model_id="resnet", key_id="k1", package_digest=digest, proof=proof,
                     client_key=z85)          # yes or a typed no: no key, nothing debited
        rel = ks.release(model_id="resnet", key_id="k1", package_digest=digest, proof=proof,
                         client_key=z85)
        try:
            decrypt_with(rel.key)
        finally:
            rel.wipe()
        lease = ks.renew(lease_id=rel.lease.lease_id, calls=10)
        ks.close_lease(lease_id=lease.lease_id, calls=3)   # refunds the unused budget
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq

from . import crypto as _crypto
from .device import Device
from .errors import (
    ConfigError,
    KeyServerError,
    KeyServerUnavailableError,
    ProtocolError,
    VaultError,
    WrongKeyServerError,
)
from .licence import Licence, LicenceProof
from .protocol import PROTOCOL_VERSION, pack_header, raise_for_reply, unpack_header

__all__ = ["KeyServerClient", "Lease", "Release"]

_MAX_REPLY = 1 << 20


@dataclass(frozen=True)
class Lease:
    """A key lease. ``expires_at``/``hard_end`` are wall-clock epoch seconds on
    *this* machine (computed from the TTL at the moment the request was sent,
    so clock skew with the server cannot lengthen a lease). ``hard_end`` is
    ``expires_at`` plus the licence's offline grace period: the last moment a
    worker may keep serving without a successful renewal. ``call_budget`` is
    how many calls may be served before the next renewal (None: unlimited);
    the key server reserved them from the quota. A budget of 0 with
    ``retry_after`` means the licence's rate limit allows no call for that
    many seconds. ``rate`` and ``burst`` are the licence's rate limit as
    the worker enforces it per call (None: no limit): at most ``burst`` calls
    at once, then ``rate`` per second."""

    lease_id: str
    ttl: float
    expires_at: float
    hard_end: float
    call_budget: int | None
    retry_after: float | None = None
    rate: float | None = None
    burst: float | None = None

    @classmethod
    def _from_wire(cls, data: Any, sent_at: float) -> Lease:
        try:
            ttl = float(data["ttl"])
            grace = float(data.get("grace") or 0.0)
            budget = data.get("call_budget")
            retry = data.get("retry_after")
            rate, burst = data.get("rate"), data.get("burst")
            return cls(
                lease_id=str(data["lease_id"]),
                ttl=ttl,
                expires_at=sent_at + ttl,
                hard_end=sent_at + ttl + grace,
                call_budget=None if budget is None else int(budget),
                retry_after=None if retry is None else float(retry),
                rate=None if rate is None else float(rate),
                burst=None if burst is None else float(burst),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError("key server sent a malformed lease") from exc


class Release:
    """A released package key (32 bytes, a mutable buffer) and its lease.
    Call :meth:`wipe` (or use ``with``) once the key has done its work."""

    def __init__(self, key: bytearray, lease: Lease) -> None:
        self.key = key
        self.lease = lease

    def wipe(self) -> None:
        _crypto.zeroize(self.key)

    def __enter__(self) -> Release:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"Release(key=<{len(self.key)} bytes hidden>, lease={self.lease!r})"

    def __reduce__(self) -> Any:
        raise TypeError("Release holds a package key and cannot be pickled")


_PROBE_S = 2.0  # what a failed request's diagnosis may add: a lookup, then a connection


def _why_silent(address: str) -> str:
    """What a request that got no answer says about ``address`` (looked at
    only then): a host name that does not resolve here, nothing listening,
    or a server that took the connection and said nothing (a CURVE
    handshake with the wrong server key fails silently). ZeroMQ tells none
    of these apart: each was a bare "no answer within 10s"."""
    m = re.fullmatch(r"tcp://\[?([^\]]+?)\]?:(\d+)", address)
    if m is None:
        return ""
    host, port = m.group(1), int(m.group(2))
    # ZeroMQ dials IPv4 unless told otherwise: that address is the one to try;
    # and a resolver that does not answer is not waited for past a bound
    found: list[Any] = []

    def resolve() -> None:
        for family in (socket.AF_INET, socket.AF_UNSPEC):
            try:
                found.extend(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
                return
            except (OSError, UnicodeError):
                continue

    looking = threading.Thread(target=resolve, name="vault-keyserver-why", daemon=True)
    looking.start()
    looking.join(_PROBE_S)
    if not found:
        return (
            f": the host name {host!r} does not resolve here (the address comes from the "
            "licence, or the device's keyserver.json: is it reachable from this machine?)"
        )
    family, kind, proto, _, addr = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.settimeout(_PROBE_S)
        try:
            probe.connect(addr)
        except ConnectionRefusedError:
            return f": nothing listens on {host} port {port} (is the key server running there?)"
        except OSError:
            return f": {host} port {port} takes no connection (a firewall, or the wrong address?)"
    return (
        f": {host} port {port} takes connections but did not answer in time (a busy key "
        "server, another service on that port, or a key server whose public key is not "
        "the one in the licence)"
    )


class KeyServerClient:
    """Talks to the key server named in ``licence``.

    ``timeout`` (seconds) bounds each request; no answer in time raises
    :class:`~vault.core.errors.KeyServerUnavailableError`. Denials come back as the
    server's typed error (``LicenceRevokedError``, ``QuotaExhaustedError``...).
    ``address`` overrides the licence's key-server address. ``device``: talk
    as that enrolled device (its CURVE key pair) instead of as the licence,
    to the device's own key server (address and key fixed at enrolment); a
    licence whose key server key is another raises
    :class:`~vault.core.errors.WrongKeyServerError`.
    """

    def __init__(
        self,
        licence: Licence | str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        address: str | None = None,
        context: zmq.Context[Any] | None = None,
        device: Device | None = None,
    ) -> None:
        self.licence = Licence.load(licence)
        self.device = device
        self.server_key = self.licence.keyserver_public_key
        self.address = address or self.licence.keyserver_address
        if device is not None:
            if not device.keyserver_address or not device.keyserver_public_key:
                raise ConfigError(
                    f"device {device.device_id} has no key server recorded: enroll it "
                    "(`vault device enroll DIR --licence admin.licence`)"
                )
            if self.licence.keyserver_public_key != device.keyserver_public_key:
                raise WrongKeyServerError(
                    f"licence {self.licence.licence_id} was issued by another key server than "
                    f"the one device {device.device_id} was enrolled with"
                )
            self.server_key = device.keyserver_public_key
            self.address = address or device.keyserver_address
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    # --- plumbing -----------------------------------------------------------

    def _socket(self) -> zmq.Socket[Any]:
        if self._closed:
            raise ConfigError("key server client is closed")
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            try:
                s.linger = 0
                s.maxmsgsize = _MAX_REPLY
                s.curve_serverkey = self.server_key.encode()
                if self.device is not None:
                    s.curve_publickey = self.device.public_key.encode()
                    s.curve_secretkey = self.device.secret_key.encode()
                else:
                    s.curve_publickey = self.licence.client_public_key.encode()
                    s.curve_secretkey = self.licence.client_secret_key.encode()
                s.connect(self.address)
            except (zmq.ZMQError, ValueError) as exc:
                s.close(0)
                raise ConfigError(f"cannot connect to key server {self.address!r}: {exc}") from exc
            self._sock = s
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _request(self, op: str, **fields: Any) -> tuple[dict[str, Any], float]:
        silent = False
        with self._lock:
            sock = self._socket()
            rid = next(self._ids)
            sent_at = time.time()
            header = {
                "v": PROTOCOL_VERSION, "op": op, "id": rid,
                "nonce": os.urandom(16), "ts": sent_at, **fields,
            }  # fmt: skip
            deadline = time.monotonic() + self.timeout
            try:
                sock.send(pack_header(header), zmq.NOBLOCK)
            except zmq.Again:
                self._drop_socket()
                raise KeyServerUnavailableError(
                    f"key server {self.address} is not accepting requests"
                ) from None
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    self._drop_socket()  # discard the queued request with the socket
                    silent = True
                    break
                frames = sock.recv_multipart()
                if len(frames) != 1:
                    continue
                try:
                    reply = unpack_header(frames[0])
                except VaultError:
                    continue
                if reply.get("id") == rid:
                    break  # anything else is a stale reply to an earlier request
            if not silent:
                raise_for_reply(reply)
                return reply, sent_at
        # looked into with the lock released: another request need not wait for it
        raise KeyServerUnavailableError(
            f"no answer from key server {self.address} within {self.timeout:g}s"
            + _why_silent(self.address)
        )

    def close(self) -> None:
        with self._lock:
            self._drop_socket()
            self._closed = True

    def __enter__(self) -> KeyServerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close() must not leave a socket for the GC to warn about.
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close(0)

    def __repr__(self) -> str:
        return f"KeyServerClient({self.address!r}, licence={self.licence.licence_id!r})"

    # --- operations -----------------------------------------------------------

    def ping(self) -> float:
        """Round trip to the server; returns the server's clock."""
        reply, _ = self._request("ping")
        return float(reply.get("time", 0.0))

    def _proof_fields(
        self, *, model_id: str, key_id: str, package_digest: str, client_key: str,
        proof: LicenceProof | None,
    ) -> dict[str, Any]:  # fmt: skip
        device_id = self.device.device_id if self.device is not None else ""
        if proof is None and self.licence.proof_key:
            proof = self.licence.prove(
                device_id=device_id, model_id=model_id, key_id=key_id,
                package_digest=package_digest, client_key=client_key,
            )  # fmt: skip
        fields: dict[str, Any] = {
            "model_id": model_id,
            "key_id": key_id,
            "package_digest": package_digest,
            "licence_id": self.licence.licence_id,
            "device_id": device_id,
        }
        if client_key:
            fields["client_key"] = client_key
        if proof is not None:
            fields.update(proof_nonce=proof.nonce, proof_ts=proof.ts, proof=proof.signature)
        return fields

    def authorize(
        self,
        *,
        model_id: str,
        key_id: str,
        package_digest: str,
        proof: LicenceProof | None = None,
        client_key: str = "",
    ) -> dict[str, Any]:
        """(as an enrolled device) Whether a release of this package's key
        would be granted to the holder whose ``proof`` this is, for the
        caller answered at ``client_key``: the licence, the proof, the device
        binding, expiry, quota, rate and revocation, checked and audited by
        the key server, which releases no key and debits nothing. A refusal
        is raised as its typed error. The daemon asks this before it starts
        or assigns any worker."""
        fields = self._proof_fields(model_id=model_id, key_id=key_id,
                                    package_digest=package_digest, client_key=client_key,
                                    proof=proof)  # fmt: skip
        reply, _ = self._request("authorize", **fields)
        if reply.get("authorized") is not True:
            raise ProtocolError("key server sent a malformed authorisation")
        return {k: reply.get(k) for k in ("licence_id", "expires_at")}

    def release(
        self,
        *,
        model_id: str,
        key_id: str,
        package_digest: str,
        suite: str = "x25519",
        proof: LicenceProof | None = None,
        client_key: str = "",
    ) -> Release:
        """Ask for a package key under this licence. ``proof`` is the caller's
        signature over this request (made here from the licence's proof key
        when the licence holds one), bound to ``client_key``, the CURVE key
        the worker will answer. The key comes sealed (HPKE) to a fresh
        ephemeral key made here, bound to model id, package digest, licence id
        and device id; any tampering is an IntegrityError."""
        device_id = self.device.device_id if self.device is not None else ""
        fields = self._proof_fields(model_id=model_id, key_id=key_id,
                                    package_digest=package_digest, client_key=client_key,
                                    proof=proof)  # fmt: skip
        eph = _crypto.EphemeralKey(suite)
        reply, sent_at = self._request(
            "release", suite=suite, ephemeral_key=eph.public_bytes, **fields
        )
        sealed = reply.get("sealed_key")
        if not isinstance(sealed, bytes):
            raise ProtocolError("key server reply lacks the sealed key")
        lease = Lease._from_wire(reply.get("lease"), sent_at)
        info = _crypto.key_release_info(
            model_id, package_digest, self.licence.licence_id, device_id
        )
        key = eph.open(sealed, info)
        if len(key) != _crypto.KEY_SIZE:
            _crypto.zeroize(key)
            raise ProtocolError("key server released a key of the wrong size")
        return Release(key, lease)

    def renew(self, *, lease_id: str, calls: int, report_id: str | None = None) -> Lease:
        """Report ``calls`` served since the last report and extend the lease;
        a revoked/expired/exhausted licence raises its typed error instead.
        ``report_id``: the report's id, so one sent again after its answer
        was lost counts once."""
        extra = {"report_id": report_id} if report_id is not None else {}
        reply, sent_at = self._request("renew", lease_id=lease_id, calls=int(calls), **extra)
        return Lease._from_wire(reply.get("lease"), sent_at)

    def close_lease(self, *, lease_id: str, calls: int, report_id: str | None = None) -> int:
        """Report the last ``calls`` and end the lease; the unused part of its
        reserved budget goes back to the quota. Returns the calls refunded."""
        extra = {"report_id": report_id} if report_id is not None else {}
        reply, _ = self._request("close", lease_id=lease_id, calls=int(calls), **extra)
        return int(reply.get("refunded_calls") or 0)

    def register_key(
        self,
        *,
        model_id: str,
        key_id: str,
        key: bytes | bytearray,
        package_digest: str,
        publisher: str | None = None,
    ) -> bool:
        """(admin) Store a package key, wrapped under the master key. Returns
        False when this exact key was already registered. ``publisher``: the
        fingerprint of the key the package is signed with (its manifest's);
        the key server refuses a key for a package its own publisher key did
        not sign (no licence it issues could open it)."""
        extra = {"publisher": publisher} if publisher is not None else {}
        reply, _ = self._request(
            "register_key",
            model_id=model_id,
            key_id=key_id,
            key=bytes(key),
            package_digest=package_digest,
            **extra,
        )
        return bool(reply.get("created"))

    def call_decisions(
        self,
        *,
        model_id: str | None,
        keys: list[str],
        usage: list[dict[str, Any]],
        grants: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """(as an enrolled device: a worker service) What each caller key may
        do with ``model_id`` for one lease, reporting ``usage`` (calls served,
        reserves given back; each report with its own id, so one sent again
        counts once); ``grants`` names each key's grant (its reserve, given
        back later by that id). See ``keyserver/calls.py``."""
        fields: dict[str, Any] = {"grants": grants} if grants else {}
        reply, _ = self._request(
            "call_decisions", model_id=model_id, keys=keys, usage=usage, **fields
        )
        return {"ttl": reply.get("ttl"), "decisions": reply.get("decisions") or {}}

    def issue(
        self,
        model_id: str,
        *,
        holder: str,
        expires: float | None = None,
        max_calls: int | None = None,
        rate_limit: float | None = None,
        grace: float = 0.0,
        kind: str = "runtime",
        same_user: bool = False,
        devices: tuple[str, ...] | list[str] = (),
        require_key: bool = False,
    ) -> Licence:
        """(admin) Issue a licence; ``expires`` is seconds from now (None: never),
        ``rate_limit`` calls per second, ``grace`` offline seconds.
        ``kind`` is ``runtime`` or ``call``; ``devices`` the only enrolled
        devices it may be used on; ``same_user`` allows tier 0 (the holder's
        own user runs the worker, and can therefore extract the model).
        ``require_key``: refused (``UnknownModelError``) unless a key is
        registered for ``model_id`` (what ``vault licence issue`` asks)."""
        reply, _ = self._request(
            "issue",
            model_id=model_id,
            holder=holder,
            expires=expires,
            max_calls=max_calls,
            rate_limit=rate_limit,
            grace=grace,
            kind=kind,
            same_user=bool(same_user),
            devices=list(devices),
            **({"require_key": True} if require_key else {}),
        )
        return Licence.from_json(reply.get("licence"), source="key server reply")

    def enroll_device(
        self, *, device_id: str, public_key: str, name: str = "", service: bool = False
    ) -> bool:
        """(admin) Enroll a device by its CURVE public key; False if it already
        was. ``service``: the device is one of the vendor's worker services
        (``vault worker serve``), the only devices that ask for call decisions
        and report calls served under call licences; an enrolled device is
        made one by enrolling it again with it."""
        reply, _ = self._request(
            "enroll_device", device_id=device_id, public_key=public_key, name=name or device_id,
            **({"service": True} if service else {}),
        )  # fmt: skip
        if service and reply.get("service") is not True:
            raise KeyServerError(
                "the key server did not record this device as a worker service (it is older "
                "than --service): upgrade it, then enroll the device again with --service"
            )
        return bool(reply.get("created"))

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """(admin) Revoke a device: it can no longer connect or obtain keys."""
        reply, _ = self._request("revoke_device", device_id=device_id)
        return {k: reply.get(k) for k in ("device_id", "revoked_at", "already")}

    def list_devices(self) -> list[dict[str, Any]]:
        """(admin) Every enrolled device."""
        reply, _ = self._request("list_devices")
        out = reply.get("devices")
        if not isinstance(out, list):
            raise ProtocolError("key server sent a malformed device list")
        return out

    def revoke(self, licence_id: str) -> dict[str, Any]:
        """(admin) Revoke a licence; its leases end at their next renewal."""
        reply, _ = self._request("revoke", licence_id=licence_id)
        return {k: reply.get(k) for k in ("licence_id", "revoked_at", "already")}

    def list(self) -> list[dict[str, Any]]:
        """(admin) Every licence with its limits and usage."""
        reply, _ = self._request("list")
        out = reply.get("licences")
        if not isinstance(out, list):
            raise ProtocolError("key server sent a malformed licence list")
        return out

"""Licence files: one self-contained file a caller is handed (like a kubeconfig).

A licence file holds the key server's address and CURVE public key, the
holder's own CURVE key pair, the licence id, its kind, an Ed25519 key pair for
proofs of possession, and the publisher's Ed25519 public key (so a worker
checks a package's signature before it asks for any key). It is JSON, written
with mode 0600.

A licence authorises a holder; it is never enough to obtain a key. Kinds:

- ``runtime``: use the model through an enrolled device (the local daemon, or
  a vendor's service). The holder signs each key request
  (:meth:`Licence.prove`); the device passes the proof on, and the key server
  checks both. ``devices`` may name the only devices it works on.
  ``same_user=True`` (issued with ``--same-user``) also lets the holder's own
  user run the worker (tier 0): that user can then extract the model.
- ``call``: call a vendor-hosted ``vault worker serve``; gives no key at all.
- ``admin``: issue, revoke and list licences, register keys, enroll devices.

Example::

    lic = Licence.load("alice.licence")
    lic.keyserver_address      # "tcp://127.0.0.1:7700"
    proof = lic.prove(device_id="dev-1a2b", model_id="m", key_id="k", package_digest="sha256:..",
                      client_key=curve_public_z85)
    lic.save("copy.licence")   # mode 0600
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .files import read_secret_file, write_private_file
from .modelscope import covers

__all__ = ["KINDS", "Licence", "LicenceProof", "write_private_file"]

LICENCE_FORMAT = "vault-licence/1"
MAX_LICENCE_FILE = 1 << 20  # a licence is a few KiB; a bounded read of anything named
KINDS = ("runtime", "call", "admin")


@dataclass(frozen=True)
class LicenceProof:
    """A licence holder's signature over one key request (see
    :func:`vault.core.crypto.licence_proof_message`). It holds no secret: it
    travels from the caller through the daemon to the key server."""

    licence_id: str
    device_id: str
    nonce: bytes
    ts: float
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "licence_id": self.licence_id,
            "device_id": self.device_id,
            "nonce": base64.b64encode(self.nonce).decode(),
            "ts": self.ts,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_wire(cls, data: Any) -> LicenceProof:
        try:
            return cls(
                licence_id=str(data["licence_id"]),
                device_id=str(data["device_id"]),
                nonce=base64.b64decode(data["nonce"], validate=True),
                ts=float(data["ts"]),
                signature=base64.b64decode(data["signature"], validate=True),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError("malformed licence proof") from exc


def _limits(data: Any) -> dict[str, Any]:
    """The ``limits`` of a licence file, each with its type (absent: none)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError("limits must be a map")
    out: dict[str, Any] = {}
    for name, kind in (("expires_at", float), ("max_calls", int), ("rate_limit", float),
                       ("grace", float)):  # fmt: skip
        v = data.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"limits.{name} must be a number")
        out[name] = kind(v)
    return out


@dataclass(repr=False)
class Licence:
    """A parsed licence file. ``client_secret`` never appears in ``repr``."""

    licence_id: str
    holder: str
    keyserver_address: str
    keyserver_public_key: str  # Z85 CURVE public key of the key server
    client_public_key: str  # Z85 CURVE public key of the holder
    client_secret_key: str  # Z85 CURVE secret key of the holder
    publisher_key: str = ""  # base64 raw Ed25519 public key of the publisher
    model_id: str | None = None  # its model scope (vault.core.modelscope); None for an admin
    role: str = "caller"  # "caller" or "admin"
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # "runtime", "call" or "admin" ("" : from the role)
    same_user: bool = False  # tier 0 allowed: the holder's user can extract the model
    devices: tuple[str, ...] = ()  # the only devices it works on (empty: any enrolled)
    proof_key: str = ""  # base64 raw Ed25519 seed: signs proofs of possession (secret)
    # the limits it was issued with, for the holder to read (the key server's
    # record decides; `vault licence list` shows usage): epoch seconds, calls,
    # calls per second, offline seconds
    expires_at: float | None = None
    max_calls: int | None = None
    rate_limit: float | None = None
    grace: float | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = "admin" if self.role == "admin" else "runtime"
        if self.kind not in KINDS:
            raise ConfigError(f"unknown licence kind {self.kind!r} (one of {', '.join(KINDS)})")
        self.devices = tuple(self.devices)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def covers(self, model_id: str) -> bool:
        """Whether this licence may be used with ``model_id`` (its model scope:
        one id, several, ``prefix*`` or ``*``; see :mod:`vault.core.modelscope`)."""
        return covers(self.model_id, model_id)

    @property
    def proof_public_key(self) -> str:
        """base64 raw Ed25519 public key of :attr:`proof_key` ("" if none)."""
        if not self.proof_key:
            return ""
        from . import crypto as _crypto  # here: reading a licence needs no cryptography

        key = _crypto.PublisherKey.from_private_raw(base64.b64decode(self.proof_key))
        return base64.b64encode(key.public_raw).decode()

    def prove(
        self,
        *,
        device_id: str,
        model_id: str,
        key_id: str,
        package_digest: str,
        client_key: str = "",
        now: float | None = None,
    ) -> LicenceProof:
        """Sign a key request for ``device_id`` with the licence's proof key,
        bound to ``client_key``: the CURVE public key (Z85) the worker will
        answer (the daemon's worker answers that key only)."""
        if not self.proof_key:
            raise ConfigError(
                f"licence {self.licence_id} has no proof key (issued by an older key server?)"
            )
        from . import crypto as _crypto  # here: reading a licence needs no cryptography

        nonce = os.urandom(16)
        ts = time.time() if now is None else now
        msg = _crypto.licence_proof_message(
            licence_id=self.licence_id, device_id=device_id, model_id=model_id, key_id=key_id,
            package_digest=package_digest, nonce=nonce, ts=ts, client_key=client_key,
        )  # fmt: skip
        key = _crypto.PublisherKey.from_private_raw(base64.b64decode(self.proof_key))
        return LicenceProof(self.licence_id, device_id, nonce, ts, key.sign(msg))

    def public_copy(self) -> Licence:
        """The licence without its secrets (no CURVE secret, no proof key): what
        a caller hands the daemon (which checks it names the device's own key
        server, and takes the publisher key from it)."""
        return Licence(
            licence_id=self.licence_id, holder=self.holder,
            keyserver_address=self.keyserver_address,
            keyserver_public_key=self.keyserver_public_key,
            client_public_key=self.client_public_key, client_secret_key="",
            publisher_key=self.publisher_key, model_id=self.model_id, role=self.role,
            kind=self.kind, same_user=self.same_user, devices=self.devices,
            expires_at=self.expires_at, max_calls=self.max_calls, rate_limit=self.rate_limit,
            grace=self.grace,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LICENCE_FORMAT,
            "licence_id": self.licence_id,
            "holder": self.holder,
            "role": self.role,
            "model_id": self.model_id,
            "keyserver": {
                "address": self.keyserver_address,
                "public_key": self.keyserver_public_key,
            },
            "client": {
                "public_key": self.client_public_key,
                "secret_key": self.client_secret_key,
            },
            "publisher_key": self.publisher_key,
            "kind": self.kind,
            "same_user": self.same_user,
            "devices": list(self.devices),
            "proof_key": self.proof_key,
            **({"limits": self.limits()} if self.limits() else {}),
            **({"extra": self.extra} if self.extra else {}),
        }

    def limits(self) -> dict[str, Any]:
        """The limits it was issued with (only those it has)."""
        out = {"expires_at": self.expires_at, "max_calls": self.max_calls,
               "rate_limit": self.rate_limit, "grace": self.grace}  # fmt: skip
        return {k: v for k, v in out.items() if v is not None}

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    def save(self, path: str | os.PathLike[str]) -> None:
        write_private_file(path, self.dumps())

    @classmethod
    def from_json(cls, data: Any, *, source: str = "licence") -> Licence:
        try:
            if data.get("format") != LICENCE_FORMAT:
                raise ConfigError(f"{source}: not a vault licence file ({LICENCE_FORMAT})")
            ks = data["keyserver"]
            cl = data["client"]
            return cls(
                licence_id=str(data["licence_id"]),
                holder=str(data["holder"]),
                keyserver_address=str(ks["address"]),
                keyserver_public_key=str(ks["public_key"]),
                client_public_key=str(cl["public_key"]),
                client_secret_key=str(cl["secret_key"]),
                publisher_key=str(data.get("publisher_key") or ""),
                model_id=data.get("model_id"),
                role=str(data.get("role", "caller")),
                extra=dict(data.get("extra") or {}),
                kind=str(data.get("kind") or ""),
                same_user=bool(data.get("same_user", False)),
                devices=tuple(str(d) for d in data.get("devices") or ()),
                proof_key=str(data.get("proof_key") or ""),
                **_limits(data.get("limits")),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ConfigError(
                f"{source}: malformed licence file ({type(exc).__name__}: {exc})"
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str] | Licence) -> Licence:
        if isinstance(path, Licence):
            return path
        p = os.fspath(path)
        if not os.path.lexists(p):
            raise ConfigError(f"{p}: licence file not found")
        raw = read_secret_file(p, limit=MAX_LICENCE_FILE, what="licence file")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ConfigError(f"{p}: not a vault licence file") from None
        return cls.from_json(data, source=p)

    def __repr__(self) -> str:
        return (
            f"Licence(id={self.licence_id!r}, holder={self.holder!r}, kind={self.kind!r}, "
            f"same_user={self.same_user}, model_id={self.model_id!r}, "
            f"keyserver={self.keyserver_address!r})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("Licence holds a secret key and cannot be pickled")

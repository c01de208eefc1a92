"""Licence files: one self-contained file a caller is handed (like a kubeconfig).

A licence file holds the key server's address and CURVE public key, the
holder's own CURVE key pair, the licence id, and the publisher's Ed25519
public key (so a worker checks a package's signature before it asks for any
key). It is JSON, written with mode 0600.

Example::

    lic = Licence.load("alice.licence")
    lic.keyserver_address      # "tcp://127.0.0.1:7700"
    lic.save("copy.licence")   # mode 0600
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .files import write_private_file

__all__ = ["Licence", "write_private_file"]

LICENCE_FORMAT = "vault-licence/1"


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
    model_id: str | None = None  # None for an admin licence
    role: str = "caller"  # "caller" or "admin"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

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
            **({"extra": self.extra} if self.extra else {}),
        }

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
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source}: malformed licence file (missing {exc})") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str] | Licence) -> Licence:
        if isinstance(path, Licence):
            return path
        p = os.fspath(path)
        try:
            with open(p, "rb") as fh:
                data = json.loads(fh.read())
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: licence file not found") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not a vault licence file") from exc
        return cls.from_json(data, source=p)

    def __repr__(self) -> str:
        return (
            f"Licence(id={self.licence_id!r}, holder={self.holder!r}, role={self.role!r}, "
            f"model_id={self.model_id!r}, keyserver={self.keyserver_address!r})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("Licence holds a secret key and cannot be pickled")

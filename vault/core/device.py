"""A device identity: the key pair of a trusted runtime host.

A device is a machine whose runtime (the local daemon, or a vendor's ``vault
worker serve``) the key server trusts to keep plaintext from its callers. Its
identity is a CURVE key pair in a directory that callers cannot read (owned by
root or by the daemon's service user, mode 0700, the secret file 0600); the
key server knows its public key once an admin has enrolled it. A key request
is authenticated as the device at the transport (CURVE), and carries the
caller's licence proof on top (see :mod:`vault.core.licence`).

::

    DIR/device.key   {"device_id", "public_key", "secret_key"}   0600
    DIR/device.pub   {"device_id", "public_key"}                 0644

Example::

    dev = init_device("/var/lib/vault/device")       # vault device init DIR
    dev.device_id                                     # "dev-3f9c0a1b2c4d5e6f"
    Device.load("/var/lib/vault/device").public_key   # Z85
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .files import write_private_file

__all__ = ["DEVICE_FORMAT", "Device", "device_id_for", "init_device"]

DEVICE_FORMAT = "vault-device/1"
KEY_FILE = "device.key"
PUB_FILE = "device.pub"


def device_id_for(public_key: str) -> str:
    """The device id: a short hash of its CURVE public key (Z85)."""
    return "dev-" + hashlib.sha256(b"vault-device/v1\x00" + public_key.encode()).hexdigest()[:16]


@dataclass(repr=False)
class Device:
    """A device's key pair. ``secret_key`` never appears in ``repr``."""

    device_id: str
    public_key: str  # Z85 CURVE public key
    secret_key: str  # Z85 CURVE secret key

    def public_json(self) -> dict[str, Any]:
        return {"format": DEVICE_FORMAT, "device_id": self.device_id, "public_key": self.public_key}

    def dumps(self) -> bytes:
        return (json.dumps({**self.public_json(), "secret_key": self.secret_key}) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, *, source: str = "device key") -> Device:
        try:
            obj = json.loads(data)
            if obj.get("format") != DEVICE_FORMAT:
                raise ConfigError(f"{source}: not a vault device key ({DEVICE_FORMAT})")
            dev = cls(str(obj["device_id"]), str(obj["public_key"]), str(obj["secret_key"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source}: malformed device key") from exc
        if len(dev.public_key) != 40 or len(dev.secret_key) != 40:
            raise ConfigError(f"{source}: malformed device key")
        if device_id_for(dev.public_key) != dev.device_id:
            raise ConfigError(f"{source}: device id does not match its key")
        return dev

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Device:
        """Read ``DIR/device.key``; a caller without the right to read it gets
        a :class:`~vault.core.errors.ConfigError` naming the file."""
        path = os.path.join(os.fspath(directory), KEY_FILE)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no device key (run `vault device init`)") from exc
        except PermissionError as exc:
            raise ConfigError(f"{path}: permission denied (the device key is not yours)") from exc
        return cls.loads(data, source=path)

    @staticmethod
    def load_public(directory: str | os.PathLike[str], *, name: str = PUB_FILE) -> dict[str, str]:
        """``{"device_id", "public_key"}`` from ``DIR/device.pub`` (no secret)."""
        path = os.path.join(os.fspath(directory), name)
        try:
            with open(path, "rb") as fh:
                obj = json.loads(fh.read())
            return {"device_id": str(obj["device_id"]), "public_key": str(obj["public_key"])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read the device's public key") from exc

    def __repr__(self) -> str:
        return f"Device({self.device_id!r})"

    def __reduce__(self) -> Any:
        raise TypeError("Device holds a secret key and cannot be pickled")


def init_device(directory: str | os.PathLike[str]) -> Device:
    """Create a device identity in ``directory`` (made 0700; refuses to
    overwrite one). Run it as the user the daemon runs as (root, or the
    service user): only that user can read the secret afterwards."""
    import zmq

    d = os.fspath(directory)
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    if os.path.exists(os.path.join(d, KEY_FILE)):
        raise ConfigError(f"{d}: already holds a device key; refusing to overwrite it")
    public, secret = zmq.curve_keypair()
    dev = Device(device_id_for(public.decode()), public.decode(), secret.decode())
    write_private_file(os.path.join(d, KEY_FILE), dev.dumps())
    pub_path = os.path.join(d, PUB_FILE)
    with open(pub_path, "w", encoding="ascii") as fh:
        fh.write(json.dumps(dev.public_json()) + "\n")
    os.chmod(pub_path, 0o644)
    return dev

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
from .files import read_secret_file, write_private_file

__all__ = ["DEVICE_FORMAT", "Device", "device_id_for", "init_device", "record_keyserver"]

DEVICE_FORMAT = "vault-device/1"
KEYSERVER_FORMAT = "vault-device-keyserver/1"
KEY_FILE = "device.key"
PUB_FILE = "device.pub"
KEYSERVER_FILE = "keyserver.json"


def device_id_for(public_key: str) -> str:
    """The device id: a short hash of its CURVE public key (Z85)."""
    return "dev-" + hashlib.sha256(b"vault-device/v1\x00" + public_key.encode()).hexdigest()[:16]


def _check_keyserver(address: Any, public_key: Any, source: str) -> tuple[str, str]:
    if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"{source}: the key server address must be tcp://... or ipc://...")
    if not isinstance(public_key, str) or len(public_key) != 40:
        raise ConfigError(f"{source}: the key server key must be a Z85 CURVE public key")
    return address, public_key


@dataclass(repr=False)
class Device:
    """A device's key pair, and the key server it was enrolled with (the only
    one it talks to). ``secret_key`` never appears in ``repr``."""

    device_id: str
    public_key: str  # Z85 CURVE public key
    secret_key: str  # Z85 CURVE secret key
    keyserver_address: str = ""  # fixed at enrolment ("" : not recorded yet)
    keyserver_public_key: str = ""  # Z85 CURVE public key of that key server

    def public_json(self) -> dict[str, Any]:
        return {"format": DEVICE_FORMAT, "device_id": self.device_id, "public_key": self.public_key}

    def dumps(self) -> bytes:
        """The key pair and the key server, as one JSON document (what a worker
        is handed on a pipe)."""
        obj: dict[str, Any] = {**self.public_json(), "secret_key": self.secret_key}
        if self.keyserver_address:
            obj["keyserver"] = {"address": self.keyserver_address,
                                "public_key": self.keyserver_public_key}  # fmt: skip
        return (json.dumps(obj) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, *, source: str = "device key") -> Device:
        try:
            obj = json.loads(data)
            if obj.get("format") != DEVICE_FORMAT:
                raise ConfigError(f"{source}: not a vault device key ({DEVICE_FORMAT})")
            dev = cls(str(obj["device_id"]), str(obj["public_key"]), str(obj["secret_key"]))
            ks = obj.get("keyserver")
            if ks is not None:
                dev.keyserver_address, dev.keyserver_public_key = _check_keyserver(
                    ks["address"], ks["public_key"], source
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source}: malformed device key") from exc
        if len(dev.public_key) != 40 or len(dev.secret_key) != 40:
            raise ConfigError(f"{source}: malformed device key")
        if device_id_for(dev.public_key) != dev.device_id:
            raise ConfigError(f"{source}: device id does not match its key")
        return dev

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, require_keyserver: bool = True) -> Device:
        """Read ``DIR/device.key`` and ``DIR/keyserver.json``; a caller without
        the right to read them gets a :class:`~vault.core.errors.ConfigError`
        naming the file. A directory made before the key server was fixed at
        enrolment (no ``keyserver.json``) is refused with what to run."""
        d = os.fspath(directory)
        path = os.path.join(d, KEY_FILE)
        if not os.path.lexists(path):
            raise ConfigError(f"{path}: no device key (run `vault device init`)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{path}: permission denied (the device key is not yours)")
        data = read_secret_file(path, limit=1 << 16, what="device key")
        dev = cls.loads(data, source=path)
        if dev.keyserver_address:  # a key file must not bring its own key server
            raise ConfigError(f"{path}: malformed device key")
        ks_path = os.path.join(d, KEYSERVER_FILE)
        try:
            with open(ks_path, "rb") as fh:
                obj = json.loads(fh.read())
            if not isinstance(obj, dict) or obj.get("format") != KEYSERVER_FORMAT:
                raise ValueError("not a key server record")
            dev.keyserver_address, dev.keyserver_public_key = _check_keyserver(
                obj.get("address"), obj.get("public_key"), ks_path
            )
        except FileNotFoundError:
            if require_keyserver:
                raise ConfigError(
                    f"{d}: no key server recorded for this device (a device directory made "
                    "before the key server was fixed at enrolment): enroll it again with "
                    f"`vault device enroll {d} --licence admin.licence`, or record the key "
                    f"server of a licence you were given: `vault device keyserver {d} "
                    "--licence FILE.licence`"
                ) from None
        except PermissionError as exc:
            raise ConfigError(f"{ks_path}: permission denied") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{ks_path}: not a key server record ({exc})") from exc
        return dev

    @staticmethod
    def load_public(directory: str | os.PathLike[str], *, name: str = PUB_FILE) -> dict[str, str]:
        """``{"device_id", "public_key"}`` from ``DIR/device.pub`` (no secret)."""
        path = os.path.join(os.fspath(directory), name)
        try:
            with open(path, "rb") as fh:
                obj = json.loads(fh.read())
            return {"device_id": str(obj["device_id"]), "public_key": str(obj["public_key"])}
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no device's public key here (vault device init DIR makes a device)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read the device's public key") from exc

    def __repr__(self) -> str:
        return f"Device({self.device_id!r}, keyserver={self.keyserver_address!r})"

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


def record_keyserver(directory: str | os.PathLike[str], *, address: str, public_key: str) -> None:
    """Fix the key server of the device in ``directory`` (``keyserver.json``,
    written atomically, owned by whoever runs this: root, or the daemon's
    service user, as for ``init``). The daemon and ``vault worker serve
    --device`` dial this key server only."""
    d = os.fspath(directory)
    if not os.path.exists(os.path.join(d, KEY_FILE)):
        raise ConfigError(f"{d}: not a device directory (run `vault device init {d}`)")
    _check_keyserver(address, public_key, d)
    path = os.path.join(d, KEYSERVER_FILE)
    data = json.dumps({"format": KEYSERVER_FORMAT, "address": address, "public_key": public_key})
    write_private_file(path, (data + "\n").encode())
    os.chmod(path, 0o644)  # public facts; the directory (0700) keeps other users out anyway

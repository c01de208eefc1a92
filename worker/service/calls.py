"""Who may call the service, and under which licence: the call policy.

A policy is asked three things: by the ZAP handler, whether a CURVE client
key may connect at all (:meth:`CallPolicy.callback`); for each call, which
licence it runs under, or the typed licence error that refuses it
(:meth:`CallPolicy.admit`); and, when it is answered, to count it
(:meth:`CallPolicy.record`).

- :class:`OpenPolicy`: every caller, one label ``local``: for an ``ipc://``
  service that only processes of this host reach.
- :class:`AllowListPolicy`: the client keys in a directory (``NAME.key``);
  the file name is the caller's label in metrics and logs.

Example::

    policy = AllowListPolicy.from_dir("clients/")
    adm = policy.admit(caller_key, "model-id")   # raises a LicenceError to refuse
    policy.record(adm, ok=True)
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from vault.core.errors import ConfigError, PermissionDeniedError

__all__ = ["Admission", "AllowListPolicy", "CallPolicy", "OpenPolicy"]


@dataclass(frozen=True)
class Admission:
    """A call let in: the licence (or caller label) it is counted against."""

    licence: str
    caller_key: str | None = None


class CallPolicy(Protocol):
    def callback(self, domain: str, key: bytes) -> bool: ...

    def admit(self, caller_key: str | None, model_id: str) -> Admission: ...

    def record(self, admission: Admission, *, ok: bool) -> None: ...


class _Usage:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def record(self, admission: Admission, *, ok: bool) -> None:
        with self._lock:
            (self.calls if ok else self.failures)[admission.licence] += 1


class OpenPolicy(_Usage):
    """Everyone who can reach the socket (an ``ipc://`` service only)."""

    def callback(self, domain: str, key: bytes) -> bool:
        del domain, key
        return False  # never used on tcp://: a CURVE service needs a real policy

    def admit(self, caller_key: str | None, model_id: str) -> Admission:
        del model_id
        return Admission("local", caller_key)


class AllowListPolicy(_Usage):
    """Client keys from files; the file's stem names the caller."""

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__()
        self.by_key = {k: name for name, k in keys.items()}

    @classmethod
    def from_dir(cls, directory: str) -> AllowListPolicy:
        import zmq.auth

        keys: dict[str, str] = {}
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise ConfigError(f"{directory}: cannot read the allow-list ({exc.strerror})") from exc
        for name in names:
            if not name.endswith((".key", ".pub")) or name.endswith("_secret"):
                continue
            path = os.path.join(directory, name)
            with open(path, "rb") as fh:
                text = fh.read().strip()
            if len(text) != 40 or b"\n" in text:
                try:
                    public, _secret = zmq.auth.load_certificate(path)
                except (ValueError, OSError):
                    raise ConfigError(
                        f"{path}: neither a Z85 public key nor a zmq certificate"
                    ) from None
                if not public:
                    continue
                text = public
            keys[name.rsplit(".", 1)[0]] = text.decode("ascii")
        return cls(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        del domain  # pyzmq passes the client key Z85-encoded
        return key.decode("ascii", "replace") in self.by_key

    def admit(self, caller_key: str | None, model_id: str) -> Admission:
        del model_id
        name = self.by_key.get(caller_key or "")
        if name is None:
            raise PermissionDeniedError("this caller is not on the service's allow-list")
        return Admission(name, caller_key)

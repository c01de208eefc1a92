"""Authenticated rows: the key server's tables trust nothing it did not write.

Whoever can write the database (a DBA, a backup restored by hand, an
attacker with the file) could otherwise insert an admin licence with their
own key, raise a quota or un-revoke a licence. Every licence row (admins
are licences) carries an HMAC-SHA256 tag over all its columns, under a key
derived from the master key (HKDF, label ``vault-keyserver/row-mac/v1``),
which the database writer does not hold. The service checks the tag
whenever it reads a row and refuses a row whose tag is wrong or missing as
if it did not exist, reporting it (a log line and a ``row_refused`` audit
record). Rotating the master key re-tags the authentic rows under the new
key and leaves refused rows refused.

Other tables use the same :meth:`RowAuth.tag` / :meth:`RowAuth.ok` with
their own table name (the name is part of the tagged message, so a tag
cannot be moved from one table to another, nor between rows).

Example::

    rows = RowAuth(master)
    rec = rows.seal(rec)          # rec.mac set
    assert rows.authentic(rec)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from vault.core import crypto as _crypto

from .policy import DeviceRecord, LicenceRecord

__all__ = ["LABEL", "RowAuth"]

LABEL = b"vault-keyserver/row-mac/v1"


def _norm(v: Any) -> Any:
    # Numbers as exact float reprs: SQLite's REAL and INTEGER affinities and
    # PostgreSQL's types may hand back 5 or 5.0 for the same stored value.
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)):
        return repr(float(v))
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, (tuple, list)):  # a licence's device ids
        return [_norm(x) for x in v]
    raise TypeError(f"cannot authenticate a {type(v).__name__} column")


def _message(table: str, values: Sequence[Any]) -> bytes:
    return json.dumps([table, *(_norm(v) for v in values)], separators=(",", ":")).encode()


def _licence_values(rec: LicenceRecord | DeviceRecord) -> list[Any]:
    return [getattr(rec, f.name) for f in dataclasses.fields(rec) if f.name != "mac"]


class RowAuth:
    """Tags and checks rows under the row key derived from ``master``."""

    def __init__(self, master: bytes | bytearray) -> None:
        self._key = _crypto.derive_key(master, LABEL)

    def tag(self, table: str, values: Sequence[Any]) -> bytes:
        return _crypto.mac(self._key, _message(table, values))

    def ok(self, table: str, values: Sequence[Any], tag: bytes | None) -> bool:
        return _crypto.mac_ok(self._key, _message(table, values), tag)

    def seal(self, rec: LicenceRecord) -> LicenceRecord:
        """The licence record with its tag set (call after every change)."""
        return dataclasses.replace(rec, mac=self.tag("licences", _licence_values(rec)))

    def authentic(self, rec: LicenceRecord) -> bool:
        return self.ok("licences", _licence_values(rec), rec.mac)

    def seal_device(self, rec: DeviceRecord) -> DeviceRecord:
        """The device record with its tag set (call after every change)."""
        return dataclasses.replace(rec, mac=self.tag("devices", _licence_values(rec)))

    def device_authentic(self, rec: DeviceRecord) -> bool:
        return self.ok("devices", _licence_values(rec), rec.mac)

    def wipe(self) -> None:
        _crypto.zeroize(self._key)

    def __repr__(self) -> str:
        return "RowAuth(<key hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("RowAuth holds a key and cannot be pickled")

"""A model repository: every ``*.vault`` in one directory, rescanned on demand.

A scan reads each package's public manifest (no key, no decryption) for its
model id, with bounded reads of regular files only (a FIFO, ``/dev/zero``, a
directory or a sparse file named ``*.vault`` is a typed error, logged and
left out, never a hang or a MemoryError); a file's ``(inode, size, mtime)``
stamp tells a replaced package from an unchanged one. A package that cannot
be read is logged and left out; the rest are served.

Example::

    repo = Repository("/srv/models")
    for model_id, path, stamp in repo.scan(log):
        ...
"""

from __future__ import annotations

import os
from typing import Any

from vault.core.errors import ConfigError, FormatError, VaultError
from vault.core.files import open_regular
from vault.core.logs import reason
from vault.core.package import read_header

__all__ = ["Repository"]


class Repository:
    def __init__(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ConfigError(f"--repository {directory}: not a directory")
        self.directory = os.path.abspath(directory)
        # files skipped, by name -> their stamp: one log line per file and version,
        # not one per rescan (--poll-interval 30 would repeat it forever)
        self._skipped: dict[str, Any] = {}

    def _skip(self, log: Any, name: str, stamp: Any, code: str, message: str) -> None:
        if self._skipped.get(name) != stamp:
            self._skipped[name] = stamp
            log("package_skipped", level="error", file=name, code=code, message=message)

    @staticmethod
    def describe(path: str) -> tuple[str, str, Any]:
        """``(model_id, absolute path, stamp)`` of one package; typed errors."""
        path = os.path.abspath(path)
        fd = open_regular(path, what="vault package", error=FormatError)
        try:
            st = os.fstat(fd)
            model_id = read_header(fd, source=path).model_id
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the package ({exc.strerror})") from exc
        finally:
            os.close(fd)
        return model_id, path, (st.st_ino, st.st_size, st.st_mtime_ns)

    def scan(self, log: Any) -> list[tuple[str, str, Any]]:
        out: list[tuple[str, str, Any]] = []
        seen: set[str] = set()
        names = sorted(os.listdir(self.directory))
        for name in names:
            if not name.endswith(".vault") or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
                stamp: Any = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                continue  # removed while we looked
            try:
                model_id, path, stamp = self.describe(path)
            except VaultError as exc:
                code, message = reason(exc)
                self._skip(log, name, stamp, code, message)
                continue
            if model_id in seen:
                self._skip(log, name, stamp, "duplicate_model_id",
                           f"another package in the repository has model id {model_id!r}")  # fmt: skip
                continue
            self._skipped.pop(name, None)
            seen.add(model_id)
            out.append((model_id, path, stamp))
        for gone in set(self._skipped) - set(names):
            del self._skipped[gone]
        return out

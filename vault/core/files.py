"""Writing secret files: mode 0600 from the first byte, atomically.

Example::

    write_private_file("alice.licence", data)
"""

from __future__ import annotations

import os

__all__ = ["write_private_file"]


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file, fsync,
    rename), so a reader never sees a partial key and no other user ever can."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

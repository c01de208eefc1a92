"""Files the vault reads and writes: secret files mode 0600 from the first
byte, and reads of regular files only, bounded.

A path a user (or a repository directory) names may be anything: a FIFO that
blocks an ``open`` for ever, ``/dev/zero`` that a ``read()`` never finishes,
a directory, a file of terabytes. :func:`open_regular` opens regular files
only (a FIFO is never opened for reading: checked before, and ``O_NONBLOCK``
in case it is swapped in between) and :func:`read_regular` reads at most a
stated size, each with a typed error naming the path.

Example::

    write_private_file("alice.licence", data)
    data = read_regular("alice.licence", limit=1 << 20, what="licence file")
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError, VaultError

__all__ = ["open_regular", "read_regular", "write_private_file"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(
    path: str | os.PathLike[str], *, what: str, error: type[VaultError] = ConfigError
) -> int:
    """A read-only descriptor of the regular file at ``path`` (the caller
    closes it); ``error`` (typed, naming the path) for anything else."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):  # never open a FIFO or a device at all
            raise error(f"{p}: {_kind(st.st_mode)}, not a {what} (regular files only)")
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except OSError as exc:
        raise error(f"{p}: cannot open the {what} ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped in between: refused all the same
        os.close(fd)
        raise error(f"{p}: {_kind(st.st_mode)}, not a {what} (regular files only)")
    return fd


def read_regular(
    path: str | os.PathLike[str], *, limit: int, what: str,
    error: type[VaultError] = ConfigError,
) -> bytes:  # fmt: skip
    """The bytes of the regular file at ``path``, at most ``limit`` of them
    (a larger file is ``error``: the caller's format has no business there)."""
    fd = open_regular(path, what=what, error=error)
    try:
        if os.fstat(fd).st_size > limit:
            raise error(f"{os.fspath(path)}: larger than {limit} bytes, not a {what}")
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:  # grew while we read
            raise error(f"{os.fspath(path)}: larger than {limit} bytes, not a {what}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file, fsync,
    rename), so a reader never sees a partial key and no other user ever can."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
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

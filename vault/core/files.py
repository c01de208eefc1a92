"""Files the vault reads and writes: secret files mode 0600 from the first
byte, secret files read only when no other user can have read or planted
them, and reads of regular files only, bounded.

A path a user (or a repository directory) names may be anything: a FIFO that
blocks an ``open`` for ever, ``/dev/zero`` that a ``read()`` never finishes,
a directory, a file of terabytes. :func:`open_regular` opens regular files
only (a FIFO is never opened for reading: checked before, and ``O_NONBLOCK``
in case it is swapped in between) and :func:`read_regular` reads at most a
stated size, each with a typed error naming the path.

A secret (a licence, a device key, a server's CURVE or master key, a
signing key, a TLS key, a database URL with its password) is read with
:func:`read_secret_file` (or checked with :func:`check_secret_file` where a
library opens it by name): a :class:`ConfigError` naming the fix unless

- the file is this user's and neither group nor others may read or write it
  (``chmod 600``), or root's and at most group-readable (``0640``: a
  Kubernetes Secret mounted with ``defaultMode: 0400`` and an ``fsGroup``;
  PostgreSQL's rule for a root-owned key);
- its directory (the one named, and the one it resolves to) is this user's
  or root's, and no other user may write it (unless sticky, as ``/tmp``:
  there nobody else may replace a file they do not own).

So a secret another user planted (even for root to read), or one another
user could have read or swapped, is never used. Public files (``*.pub``,
``worker.key``) are read as any file.

Example::

    write_private_file("alice.licence", data)
    data = read_secret_file("alice.licence", limit=1 << 20, what="licence file")
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import ConfigError, VaultError

__all__ = [
    "check_secret_file",
    "open_regular",
    "read_regular",
    "read_secret_file",
    "write_private_file",
]

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
        return _read_fd(fd, os.fspath(path), limit, what, error)
    finally:
        os.close(fd)


def _read_fd(fd: int, p: str, limit: int, what: str, error: type[VaultError]) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = os.read(fd, limit + 1 - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > limit:  # grew while we read
        raise error(f"{p}: larger than {limit} bytes, not a {what}")
    return b"".join(chunks)


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _check_secret_stat(p: str, st: os.stat_result, what: str) -> None:
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (me, 0):
        raise ConfigError(
            f"{p}: the {what} belongs to {_owner(st.st_uid)}, not to this user ({_owner(me)}) "
            "or root: another user made it or can change it, so it is not used; copy it into "
            f"a file of your own (`install -m 600 {p} NEW`) and use that"
        )
    # root's may be group-readable (a Kubernetes Secret with an fsGroup), no more
    loose = 0o026 if st.st_uid == 0 else 0o066
    if mode & loose:
        if st.st_uid != me:  # root's, read by another user, who cannot chmod it
            raise ConfigError(
                f"{p}: the {what} is open to other users (mode {mode:04o}) and is root's, not "
                f"yours to change: copy it into a file of your own (`install -m 600 {p} NEW`) "
                "and use that, or ask root to hand it over as yours (`install -o USER -m 600`)"
            )
        raise ConfigError(
            f"{p}: the {what} is open to other users (mode {mode:04o}): `chmod 600 {p}`"
            + (" (root's may be 0640: group-readable, no more)" if st.st_uid == 0 else "")
        )


def _check_secret_dir(p: str, directory: str, what: str) -> None:
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot check its directory {directory} ({exc.strerror})") from None
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise ConfigError(
            f"{p}: its directory {directory} belongs to {_owner(st.st_uid)}, who can replace "
            f"the {what}: keep it in a directory of your own (`mkdir -m 700 DIR`)"
        )
    if stat.S_IMODE(st.st_mode) & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{p}: its directory {directory} is writable by other users, who can replace the "
            f"{what}: `chmod go-w {directory}`, or keep it in a directory of your own"
        )


def _check_secret_dirs(p: str, what: str) -> None:
    named = os.path.dirname(os.path.abspath(p))
    real = os.path.dirname(os.path.realpath(p))
    for d in dict.fromkeys((named, real)):
        _check_secret_dir(p, d, what)


def check_secret_file(path: str | os.PathLike[str], *, what: str) -> None:
    """:class:`ConfigError` unless ``path`` is a regular file that may hold a
    secret (see the module docstring), for a library that opens it by name."""
    fd = open_regular(path, what=what)
    try:
        _check_secret_stat(os.fspath(path), os.fstat(fd), what)
    finally:
        os.close(fd)
    _check_secret_dirs(os.fspath(path), what)


def read_secret_file(path: str | os.PathLike[str], *, limit: int, what: str) -> bytes:
    """:func:`read_regular` for a secret: the checks of the module docstring
    on the very file read (its descriptor) and on its directories."""
    p = os.fspath(path)
    fd = open_regular(p, what=what)
    try:
        _check_secret_stat(p, os.fstat(fd), what)
        _check_secret_dirs(p, what)
        if os.fstat(fd).st_size > limit:
            raise ConfigError(f"{p}: larger than {limit} bytes, not a {what}")
        return _read_fd(fd, p, limit, what, ConfigError)
    finally:
        os.close(fd)


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file, fsync,
    rename), so a reader never sees a partial key and no other user ever can.
    A path that is not a file (``/dev/stdout``, a pipe, a terminal) is written
    to as it is: renaming over it replaced root's ``/dev/stdout`` link with a
    file holding the secret."""
    path = os.fspath(path)
    try:
        st = os.stat(path)  # where a link leads: /dev/stdout -> /proc/self/fd/1
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)  # what was opened, not what was looked at
            if not stat.S_ISREG(st.st_mode):
                if st.st_uid not in (os.geteuid(), 0):
                    # a pipe another user planted where the secret was to go
                    raise ConfigError(f"{path}: {_kind(st.st_mode)} of another user: "
                                      "not writing a secret to it")  # fmt: skip
                with os.fdopen(fd, "wb", closefd=False) as out:
                    out.write(data)
                return
        finally:
            os.close(fd)
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

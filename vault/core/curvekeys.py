"""A service's CURVE key pair on disk, and the forms a caller may name it in.

``vault worker keygen DIR`` writes a ZeroMQ certificate pair (the format of
``zmq.auth``): ``DIR/worker.key`` (public, 0644) and ``DIR/worker.key_secret``
(both keys, 0600 from the first byte). ``vault worker serve`` without
``--server-secret`` keeps such a pair beside its device (or its repository),
made on first start, so a restart keeps its key and its callers' copies of it
stay valid.

A caller names the service's public key (``vault.connect(server_key=...)``,
the hybrid's ``server_key=``) as the 40-character Z85 text, a file holding
that one line (``--server-key-out worker.pub``), or the public certificate
(``worker.key``); the secret certificate is refused there (a vendor who
gives it where the public key goes might hand it out).

Example::

    public, secret, created = stable_server_keys("/var/lib/vault/device")
    read_public_key("worker.pub") == read_public_key("keys/worker.key")
"""

from __future__ import annotations

import os
import time

import zmq
import zmq.auth
import zmq.utils.z85

from .errors import ConfigError
from .files import read_regular, read_secret_file, write_private_file

__all__ = [
    "PUBLIC_NAME",
    "SECRET_NAME",
    "load_secret_certificate",
    "read_public_key",
    "stable_server_keys",
    "write_certificates",
]

PUBLIC_NAME = "worker.key"
SECRET_NAME = "worker.key_secret"
_Z85_LEN = 40
_CERT_LIMIT = 64 * 1024  # a certificate is a few hundred bytes


def _cert_text(public: bytes, secret: bytes | None) -> bytes:
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ****  Generated on {time.strftime('%Y-%m-%d %H:%M:%S')} by vault  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
        "#   Exchange securely, or use a secure mechanism to verify the contents",
        "#   of this file after exchange. Store public certificates in your home",
        "#   directory, in the .curve subdirectory.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def write_certificates(directory: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """A new key pair as ``DIR/worker.key`` (0644) and ``DIR/worker.key_secret``
    (0600, written whole under that mode: no moment another user could read it)."""
    d = os.fspath(directory)
    public, secret = zmq.curve_keypair()
    write_private_file(os.path.join(d, SECRET_NAME), _cert_text(public, secret))
    pub_path = os.path.join(d, PUBLIC_NAME)
    tmp = f"{pub_path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(_cert_text(public, None))
    os.chmod(tmp, 0o644)
    os.replace(tmp, pub_path)
    return public, secret


def load_secret_certificate(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a secret certificate; :class:`ConfigError`
    naming the file if it is missing, unreadable or holds no secret."""
    p = os.fspath(path)
    # what the file holds first: the public certificate given by mistake
    # (keys/worker.key, 0644 as it should be) is named as such, not sent to
    # chmod a file that holds no secret; then the checks of a secret (owner,
    # mode, directories) on the very descriptor the key is read from
    _secret_certificate(p, read_regular(p, limit=_CERT_LIMIT, what="secret CURVE key"))
    return _secret_certificate(p, read_secret_file(p, limit=_CERT_LIMIT, what="secret CURVE key"))


def _parse_certificate(data: bytes) -> tuple[bytes | None, bytes | None]:
    """``(public, secret)`` of a zmq certificate's text (``zmq.auth``'s
    format: ``public-key = "..."``, ``secret-key = "..."``), None where absent."""
    public = secret = None
    for raw in data.splitlines():
        line = raw.strip()
        if line.startswith(b"public-key") and b"=" in line:
            public = line.split(b"=", 1)[1].strip(b" \t'\"")
        elif line.startswith(b"secret-key") and b"=" in line:
            secret = line.split(b"=", 1)[1].strip(b" \t'\"")
    return public, secret


def _secret_certificate(p: str, data: bytes) -> tuple[bytes, bytes]:
    public, secret = _parse_certificate(data)
    if not public:
        raise ConfigError(
            f"{p}: not a zmq secret certificate (`vault worker keygen DIR` writes one as "
            "DIR/worker.key_secret)"
        )
    if not secret:
        hint = f" ({p}_secret?)" if os.path.exists(p + "_secret") else ""
        raise ConfigError(
            f"{p}: holds no secret key: it is a public certificate, the one callers get; "
            f"the service takes the secret one, the *.key_secret file{hint}"
        )
    return public, secret


def stable_server_keys(directory: str | os.PathLike[str]) -> tuple[bytes, bytes, bool]:
    """The key pair kept in ``DIR/worker.key_secret``, made there on first
    use: ``(public, secret, created)``. :class:`ConfigError` when the
    directory cannot hold it (read-only, not ours)."""
    d = os.fspath(directory)
    path = os.path.join(d, SECRET_NAME)
    if os.path.exists(path):
        public, secret = load_secret_certificate(path)
        return public, secret, False
    try:
        public, secret = write_certificates(d)
    except OSError as exc:
        raise ConfigError(
            f"cannot keep the service's CURVE key in {d} ({exc.strerror}): make one with "
            "`vault worker keygen DIR` and give --server-secret DIR/worker.key_secret"
        ) from None
    return public, secret, True


def read_public_key(value: str | os.PathLike[str]) -> str:
    """The Z85 public key named by ``value``: the key itself, a file holding
    it on one line, or a public zmq certificate file (a secret one is
    refused: :class:`ConfigError`)."""
    text = os.fspath(value)
    if len(text) == _Z85_LEN and not os.path.exists(text):
        return _checked(text, "server_key")
    try:
        with open(text, "rb") as fh:
            data = fh.read(64 * 1024)
    except FileNotFoundError:
        raise ConfigError(
            f"server_key {text!r}: neither a 40-character Z85 key nor a file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"server_key {text}: cannot read it ({exc.strerror})") from None
    stripped = data.strip()
    if len(stripped) == _Z85_LEN and b"\n" not in stripped:
        return _checked(stripped.decode("ascii", "replace"), text)
    public, secret = _parse_certificate(data)
    if not public:
        raise ConfigError(
            f"{text}: not a server key (one Z85 line, or a zmq certificate such as "
            "`vault worker keygen`'s worker.key)"
        )
    if secret:
        # the service's secret where its public key goes: it works, and it
        # would be handed out as it is (whoever holds it can be the service)
        pub = text[: -len("_secret")] if text.endswith("_secret") else "worker.key"
        raise ConfigError(
            f"{text} holds the service's SECRET key: give its public key instead ({pub}, "
            "or the --server-key-out file); the secret one is for --server-secret only "
            "and is never handed to callers"
        )
    return _checked(public.decode("ascii", "replace"), text)


def _checked(key: str, source: str) -> str:
    try:
        raw = zmq.utils.z85.decode(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{source}: not a 40-character Z85 CURVE public key")
    return key

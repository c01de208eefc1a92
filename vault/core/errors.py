"""Every error the vault raises, in one tree.

Each class has a stable ``code`` that crosses the wire: a worker or key server
answers ``{"code": ..., "message": ...}`` and the caller's side raises the same
class again with :func:`from_wire`. The CLI catches :class:`VaultError` only and
prints one line; anything else is a bug and shows its traceback.

::

    VaultError                       vault_error
    ├── IntegrityError               integrity        (any failure to authenticate/decrypt; opaque)
    ├── FormatError                  format           (not a package, damaged framing)
    │   └── UnsupportedVersionError  unsupported_version
    ├── SealError                    seal             (a model refused at seal time)
    │   └── UnsafeModelError         unsafe_model     (not pure computation: at seal and at load)
    ├── LicenceError                 licence
    │   ├── UnknownLicenceError      licence_unknown
    │   ├── LicenceRevokedError      licence_revoked
    │   ├── LicenceExpiredError      licence_expired
    │   ├── QuotaExhaustedError      quota_exhausted
    │   │   └── TokenSpentError      token_spent      (a bearer token's own call budget)
    │   ├── RateLimitedError         rate_limited
    │   ├── WrongModelError          wrong_model
    │   ├── DigestMismatchError      digest_mismatch
    │   ├── WrongKeyServerError      wrong_keyserver  (a licence of another key server than the device's)
    │   ├── PermissionDeniedError    permission_denied
    │   └── TokenError               token_invalid    (a bearer token: missing, malformed, forged; opaque)
    │       └── TokenExpiredError    token_expired
    ├── KeyServerError               keyserver
    │   └── KeyServerUnavailableError keyserver_unavailable
    ├── AuditError                   audit            (audit record not written: fail closed)
    ├── InputError                   bad_input        (unknown/missing name, wrong dtype or shape)
    ├── ProtocolError                protocol         (malformed frame, wrong version, too big)
    ├── ComputeError                 compute          (inference failed; text sanitised)
    ├── ConfigError                  config           (refused option, missing provider)
    │   ├── UnknownModelError        unknown_model    (a service serves no such model)
    │   └── UntrustedDaemonError     untrusted_daemon (the daemon socket is served by another user)
    └── WorkerError                  worker
        ├── WorkerCrashedError       worker_crashed
        ├── WorkerTimeoutError       timeout
        ├── CapacityError            capacity         (too many workers: of this user, or in all)
        └── ServiceUnavailableError  unavailable      (a service draining or stopping)

Example::

    try:
        model.compute({"x": arr})
    except vault.InputError as exc:
        print(exc.code, exc)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuditError",
    "CapacityError",
    "ComputeError",
    "ConfigError",
    "DigestMismatchError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "KeyServerError",
    "KeyServerUnavailableError",
    "LicenceError",
    "LicenceExpiredError",
    "LicenceRevokedError",
    "PermissionDeniedError",
    "ProtocolError",
    "QuotaExhaustedError",
    "RateLimitedError",
    "SealError",
    "ServiceUnavailableError",
    "TokenError",
    "TokenExpiredError",
    "TokenSpentError",
    "UnknownLicenceError",
    "UnknownModelError",
    "UnsafeModelError",
    "UnsupportedVersionError",
    "UntrustedDaemonError",
    "VaultError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerTimeoutError",
    "WrongKeyServerError",
    "WrongModelError",
    "from_wire",
    "shown",
]


class VaultError(Exception):
    """Base of every error this package raises on purpose."""

    code = "vault_error"
    default_message = "vault error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.default_message

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    def diagnostics(self) -> str:
        return f"error[{self.code}]: {self.message}"


class IntegrityError(VaultError):
    """The package (or a sealed message) failed to authenticate or decrypt.

    One opaque error for every cause, so an attacker learns nothing about
    which check failed (as ``cryptography``'s ``InvalidToken``).
    """

    code = "integrity"
    default_message = "package failed to authenticate or decrypt"


class FormatError(VaultError):
    code = "format"
    default_message = "not a vault package"


class UnsupportedVersionError(FormatError):
    code = "unsupported_version"
    default_message = "unsupported package or protocol version"


class SealError(VaultError):
    code = "seal"
    default_message = "model refused at seal time"


class UnsafeModelError(SealError):
    """A graph that is not pure computation (external data by path, a
    custom-op domain, a value the channel cannot carry, malformed bytes):
    refused by ``seal`` and again by the worker when it loads a package."""

    code = "unsafe_model"
    default_message = "the model is not pure computation"


class LicenceError(VaultError):
    code = "licence"
    default_message = "licence does not allow this"


class UnknownLicenceError(LicenceError):
    code = "licence_unknown"
    default_message = "unknown licence"


class LicenceRevokedError(LicenceError):
    code = "licence_revoked"
    default_message = "licence revoked"


class LicenceExpiredError(LicenceError):
    code = "licence_expired"
    default_message = "licence expired"


class QuotaExhaustedError(LicenceError):
    code = "quota_exhausted"
    default_message = "licence call quota exhausted"


class RateLimitedError(LicenceError):
    """Too many calls or requests for now. ``retry_after`` (seconds, or None
    when unknown) says when one more will be let through; it crosses the
    wire as a field of the error, and the message says it too."""

    code = "rate_limited"
    default_message = "licence rate limit exceeded"

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        if retry_after is not None and message is not None and "retry after" not in message:
            message = f"{message}; retry after {retry_after:.3g} s"
        super().__init__(message)
        self.retry_after = retry_after

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


class WrongModelError(LicenceError):
    code = "wrong_model"
    default_message = "licence is not for this model"


class DigestMismatchError(LicenceError):
    code = "digest_mismatch"
    default_message = "package digest does not match the registered package"


class WrongKeyServerError(LicenceError):
    """A licence issued by another key server than the one the device was
    enrolled with: a device talks to its own key server only."""

    code = "wrong_keyserver"
    default_message = "the licence is not from this device's key server"


class PermissionDeniedError(LicenceError):
    code = "permission_denied"
    default_message = "operation needs an admin licence"


class TokenError(LicenceError):
    """A bearer token (see :mod:`vault.core.token`) that is missing, malformed,
    not signed by the licence it names, or not for that licence: one opaque
    error, so a forger learns nothing about which check failed."""

    code = "token_invalid"
    default_message = "no valid bearer token"


class TokenExpiredError(TokenError):
    code = "token_expired"
    default_message = "the bearer token has expired"


class TokenSpentError(QuotaExhaustedError):
    code = "token_spent"
    default_message = "the bearer token's call budget is spent"


class KeyServerError(VaultError):
    code = "keyserver"
    default_message = "key server error"


class KeyServerUnavailableError(KeyServerError):
    code = "keyserver_unavailable"
    default_message = "key server unreachable"


class AuditError(VaultError):
    code = "audit"
    default_message = "audit record could not be written"


class InputError(VaultError):
    code = "bad_input"
    default_message = "bad input"


class ProtocolError(VaultError):
    code = "protocol"
    default_message = "malformed message"


class ComputeError(VaultError):
    code = "compute"
    default_message = "inference failed"


class ConfigError(VaultError):
    code = "config"
    default_message = "invalid configuration"


class UnknownModelError(ConfigError):
    code = "unknown_model"
    default_message = "no such model is served here"


class UntrustedDaemonError(ConfigError):
    """The process listening on the daemon's socket is neither root nor the
    configured daemon user (``$VAULT_DAEMON_USER``): a relay, not the daemon."""

    code = "untrusted_daemon"
    default_message = "the daemon socket is not served by the vault daemon"


class WorkerError(VaultError):
    code = "worker"
    default_message = "worker error"


class WorkerCrashedError(WorkerError):
    code = "worker_crashed"
    default_message = "worker process died"


class WorkerTimeoutError(WorkerError):
    code = "timeout"
    default_message = "worker did not answer in time"


class CapacityError(WorkerError):
    """No worker now: the daemon's cap on live or starting workers (of this
    caller's user, or in all) is reached. Close a model, or retry later."""

    code = "capacity"
    default_message = "too many workers"


class ServiceUnavailableError(WorkerError):
    code = "unavailable"
    default_message = "the service is not taking calls"


def _all_subclasses(cls: type[VaultError]) -> list[type[VaultError]]:
    out: list[type[VaultError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[VaultError]] = {c.code: c for c in _all_subclasses(VaultError)}


def from_wire(payload: Any) -> VaultError:
    """Rebuild the typed error a peer sent as ``{"code", "message"}``."""
    if not isinstance(payload, dict):
        return ProtocolError("peer sent a malformed error")
    code = payload.get("code")
    message = payload.get("message")
    cls = _BY_CODE.get(code if isinstance(code, str) else "", VaultError)
    text = str(message) if message is not None else None
    if cls is RateLimitedError:
        retry = payload.get("retry_after")
        if isinstance(retry, (int, float)) and not isinstance(retry, bool) and 0 <= retry < 1e9:
            return RateLimitedError(text, retry_after=float(retry))
        return RateLimitedError(text)
    return cls(text)


def shown(name: Any, most: int = 120) -> str:
    """A caller's name as a refusal repeats it: its repr, cut to ``most``
    characters (a 100 KB model name made the gRPC door's error trailer too
    large for the client to read)."""
    text = repr(name)
    return text if len(text) <= most else text[: most - 3] + "..."

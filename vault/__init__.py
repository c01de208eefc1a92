"""vault: ship a protected ONNX model.

A model vendor seals an ONNX pipeline (pre-process, model, post-process) into
an encrypted, signed package; a key server releases its key only to licensed
callers; an isolated worker process alone holds the plaintext and answers
compute requests over ZeroMQ.

Example::

    import vault
    with vault.open("model.vault", licence="alice.licence") as model:
        print(model.inputs, model.outputs)
        out = model.compute({"image": arr})

Names are imported lazily, so ``import vault`` stays cheap for a caller that
only computes (sealing pulls in ``onnx``; computing does not).
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from .core.errors import (
    AuditError,
    ComputeError,
    ConfigError,
    DigestMismatchError,
    FormatError,
    InputError,
    IntegrityError,
    KeyServerError,
    KeyServerUnavailableError,
    LicenceError,
    LicenceExpiredError,
    LicenceRevokedError,
    PermissionDeniedError,
    ProtocolError,
    QuotaExhaustedError,
    RateLimitedError,
    SealError,
    UnknownLicenceError,
    UnsafeModelError,
    UnsupportedVersionError,
    VaultError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
    WrongModelError,
)

if _TYPE_CHECKING:  # pragma: no cover
    from .client import Model, connect, open
    from .core.crypto import PublisherKey
    from .core.licence import Licence
    from .core.package import Package, inspect
    from .sealing import SealResult, seal

__version__ = "0.1.0"

_LAZY = {
    "open": "client",
    "connect": "client",
    "Model": "client",
    "seal": "sealing",
    "SealResult": "sealing",
    "Package": "core.package",
    "inspect": "core.package",
    "Licence": "core.licence",
    "PublisherKey": "core.crypto",
}

__all__ = [
    "AuditError",
    "ComputeError",
    "ConfigError",
    "DigestMismatchError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "KeyServerError",
    "KeyServerUnavailableError",
    "Licence",
    "LicenceError",
    "LicenceExpiredError",
    "LicenceRevokedError",
    "Model",
    "Package",
    "PermissionDeniedError",
    "ProtocolError",
    "PublisherKey",
    "QuotaExhaustedError",
    "RateLimitedError",
    "SealError",
    "SealResult",
    "UnknownLicenceError",
    "UnsafeModelError",
    "UnsupportedVersionError",
    "VaultError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerTimeoutError",
    "WrongModelError",
    "__version__",
    "connect",
    "inspect",
    "open",
    "seal",
]


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vault' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

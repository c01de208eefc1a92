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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
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
    UnsupportedVersionError,
    VaultError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
    WrongModelError,
)

if TYPE_CHECKING:  # pragma: no cover
    from ._seal import SealResult, seal
    from .client import Model, connect, open
    from .licence import Licence
    from .package import Package, inspect

__version__ = "0.1.0"

_LAZY = {
    "open": "client",
    "connect": "client",
    "Model": "client",
    "seal": "_seal",
    "SealResult": "_seal",
    "Package": "package",
    "inspect": "package",
    "Licence": "licence",
}

__all__ = [
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
    "QuotaExhaustedError",
    "RateLimitedError",
    "SealError",
    "SealResult",
    "UnknownLicenceError",
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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vault' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

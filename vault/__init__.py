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
    CapacityError,
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
    ServiceUnavailableError,
    TokenError,
    TokenExpiredError,
    TokenSpentError,
    UnknownLicenceError,
    UnknownModelError,
    UnsafeModelError,
    UnsupportedVersionError,
    UntrustedDaemonError,
    VaultError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
    WrongKeyServerError,
    WrongModelError,
)

if _TYPE_CHECKING:  # pragma: no cover
    from .client import Model, connect
    from .core.crypto import PublisherKey
    from .core.licence import Licence
    from .core.package import Package, inspect
    from .core.token import mint_token
    from .hybrid.client import HybridModel
    from .sealing import SealResult, seal

__version__ = "0.1.0"

_LAZY = {
    "connect": "client",
    "Model": "client",
    "seal": "sealing",
    "SealResult": "sealing",
    "Package": "core.package",
    "inspect": "core.package",
    "Licence": "core.licence",
    "PublisherKey": "core.crypto",
    "mint_token": "core.token",
}

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
    "__version__",
    "connect",
    "inspect",
    "mint_token",
    "open",
    "seal",
]


def open(  # noqa: A001 - the public contract is vault.open()
    path: _Any, licence: _Any = None, *, server: _Any = None, **kwargs: _Any
) -> "Model | HybridModel":
    """Open a sealed model and return a Model (``inputs``, ``outputs``,
    ``compute``, ``close``; a context manager).

    A ``*.vault`` package runs in a worker from the local daemon (tier 1; see
    :func:`vault.client.open` for ``daemon=``, ``providers=``, ``timeout=`` and
    the tier-0 rule). A directory written by ``vault split`` opens as a
    hybrid with the same interface: its head runs here and its sealed tail on
    ``server`` (see :func:`vault.hybrid.client.open_split` for its keywords).
    """
    import os as _os

    if _os.path.isdir(path):
        from .hybrid.client import open_split

        lic = licence if licence is not None else kwargs.pop("license", None)
        if lic is None:
            raise ConfigError("vault.open needs licence=...")
        return open_split(path, lic, server=server, **kwargs)
    if server is not None:
        raise ConfigError("server=... is for a split model directory (vault split)")
    _prestart(licence if licence is not None else kwargs.get("license"), kwargs)
    from .client import open as _open_package

    return _open_package(path, licence, **kwargs)


def _prestart(licence: _Any, kwargs: dict[str, _Any]) -> None:
    """The first tier-0 open in a process starts its worker before the
    client's own imports (numpy, pyzmq, ``cryptography``: 120-200 ms here),
    so that the worker's interpreter start, hardening and imports run beside
    them; the open then hands that worker its package as it would any
    pre-started one (``vault/core/standby.py``), with the same key
    (interpreter, ``worker_args``). Only where the open is sure to be tier 0
    and fit such a worker: no daemon, a runtime licence issued same-user, no
    CUDA; otherwise (and once the client is loaded, whose own pre-started
    worker then serves) nothing happens here, and nothing here fails an
    open: the open itself says what is wrong."""
    import sys as _sys

    if "vault.client" in _sys.modules or licence is None:
        return
    try:
        from .core import standby
        from .core.daemonwire import daemon_socket
        from .core.licence import Licence as _Licence

        if daemon_socket(kwargs.get("daemon")) is not None:
            return  # the daemon's worker (tier 1)
        key = standby.key_for(_sys.executable, kwargs.get("worker_args") or (),
                              kwargs.get("device"), kwargs.get("providers"))  # fmt: skip
        lic = _Licence.load(licence) if key is not None else None
        if key is None or lic is None or lic.kind != "runtime" or not lic.same_user:
            return
        standby.POOL.refill(key, wait=True)  # a spawn: a few ms
    except Exception:  # noqa: BLE001 - the open itself says what is wrong
        return


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vault' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

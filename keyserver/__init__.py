"""The licensing key server: releases package keys to licensed callers.

Package keys are kept wrapped under a master key in SQLite (WAL); a caller
authenticated by its licence's CURVE key asks for a key with a fresh HPKE
ephemeral public key and gets it sealed to that key, plus a lease. Every
decision is an append-only, hash-chained audit record, written before any
key leaves (fail closed).

Modules: :mod:`.layout` (the directory, init, master rotation),
:mod:`.store` (every SQL statement: SQLite; PostgreSQL in :mod:`.store_pg`),
:mod:`.audit` (the chain), :mod:`.policy` (licence rules), :mod:`.service`
(decisions only), :mod:`.server` (ZeroMQ loop, ZAP), :mod:`.commands` (the
command line, shared by ``python -m keyserver`` and ``vault keyserver``).

Example::

    from keyserver import init_dir, serve
    init_dir("ks", address="tcp://127.0.0.1:7700")
    serve("ks", bind="tcp://127.0.0.1:7700", lease_ttl=60)   # until SIGTERM
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy names (PEP 562): `vault keyserver --help` builds its parser from
# keyserver.commands without importing ZeroMQ, the store or the crypto.
_LAZY = {
    "AuditProblem": "audit",
    "verify": "audit",
    "DEFAULT_ADDRESS": "layout",
    "Paths": "layout",
    "init_dir": "layout",
    "load_master": "layout",
    "rotate_master": "layout",
    "AllOf": "policy",
    "Context": "policy",
    "Policy": "policy",
    "default_release_policy": "policy",
    "default_renew_policy": "policy",
    "serve": "server",
    "DEFAULT_LEASE_TTL": "service",
    "KeyService": "service",
    "open_store": "store",
    "Store": "store",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'keyserver' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_LEASE_TTL",
    "AllOf",
    "AuditProblem",
    "Context",
    "KeyService",
    "Paths",
    "Policy",
    "Store",
    "default_release_policy",
    "default_renew_policy",
    "init_dir",
    "load_master",
    "open_store",
    "rotate_master",
    "serve",
    "verify",
]

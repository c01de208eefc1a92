"""The licensing key server: releases package keys to licensed callers.

Package keys are kept wrapped under a master key in SQLite (WAL); a caller
authenticated by its licence's CURVE key asks for a key with a fresh HPKE
ephemeral public key and gets it sealed to that key, plus a lease. Every
decision is an append-only, hash-chained audit record, written before any
key leaves (fail closed).

Modules: :mod:`.layout` (the directory, init, master rotation),
:mod:`.store` (SQLite), :mod:`.audit` (the chain), :mod:`.policy` (licence
rules), :mod:`.service` (decisions), :mod:`.server` (ZeroMQ loop, ZAP).

Example::

    from keyserver import init_dir, serve
    init_dir("ks", address="tcp://127.0.0.1:7700")
    serve("ks", bind="tcp://127.0.0.1:7700", lease_ttl=60)   # until SIGTERM
"""

from __future__ import annotations

from .audit import AuditProblem, verify
from .layout import DEFAULT_ADDRESS, Paths, init_dir, load_master, rotate_master
from .policy import AllOf, Context, Policy, default_release_policy, default_renew_policy
from .server import serve
from .service import DEFAULT_LEASE_TTL, KeyService

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_LEASE_TTL",
    "AllOf",
    "AuditProblem",
    "Context",
    "KeyService",
    "Paths",
    "Policy",
    "default_release_policy",
    "default_renew_policy",
    "init_dir",
    "load_master",
    "rotate_master",
    "serve",
    "verify",
]

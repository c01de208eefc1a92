"""The production worker service (``vault worker serve``).

Many sealed models routed by model id, a supervised pool of hardened worker
processes per model, dynamic batching, per-caller call policy, Prometheus
metrics and probes over HTTP, structured JSON logs, graceful drain. See
:mod:`worker.service.service` for the loop and docs/service.md for the whole.
"""

from __future__ import annotations

from .calls import Admission, AllowListPolicy, CallLicencePolicy, CallPolicy, OpenPolicy
from .instances import LaunchSpec
from .logs import JsonLog
from .service import ServiceConfig, WorkerService

__all__ = [
    "Admission",
    "AllowListPolicy",
    "CallLicencePolicy",
    "CallPolicy",
    "JsonLog",
    "LaunchSpec",
    "OpenPolicy",
    "ServiceConfig",
    "WorkerService",
]

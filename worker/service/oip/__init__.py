"""The Open Inference Protocol v2 (KServe v2 / Triton) at the service's edge.

REST (:mod:`.rest`) and gRPC (:mod:`.grpc_door`) doors onto the service's
one data plane (:mod:`.door`), served by :mod:`.server`; tensors converted
by :mod:`.tensors`. See docs/protocol.md.
"""

from __future__ import annotations

from .server import OipConfig, OipServer, is_loopback

__all__ = ["OipConfig", "OipServer", "is_loopback"]

"""The service's Prometheus metrics and its HTTP endpoints.

``/metrics`` (Prometheus text format, from ``prometheus_client``),
``/healthz`` and ``/v2/health/live`` (the service loop turns), ``/readyz`` and
``/v2/health/ready`` (:meth:`WorkerService.ready`: the initial load has
finished, a model is ready, not draining), ``/v2/models/{m}/ready`` and
``/v2/models/{m}/versions/{v}/ready`` (that model takes calls). Metric names
follow Triton's in spirit, per model and per licence:

- ``vault_requests_total{model,licence,outcome,code}``: calls answered
  (``outcome`` is ``success`` or ``failure``; ``code`` the error code or ``ok``)
- ``vault_queue_seconds{model}``: time from arrival to dispatch to a worker
- ``vault_compute_seconds{model}``: time from dispatch to the worker's answer
- ``vault_batch_size{model}``: rows per worker call that succeeded (a call
  the worker refused, a bad input, computed no rows and is not counted)
- ``vault_instances{model,state}``: worker processes by state
- ``vault_worker_restarts_total{model}``, ``vault_inflight{model}``,
  ``vault_model_ready{model}`` (1 or 0)

Example::

    metrics = Metrics()
    http = HttpEndpoints(metrics, service, host="127.0.0.1", port=0).start()
    http.port      # the bound port; http.stop() ends it
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from vault.core.errors import shown

__all__ = ["HttpEndpoints", "Metrics"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric of one service, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vault_requests", "Calls answered, by outcome", ["model", "licence", "outcome", "code"],
            registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "vault_queue_seconds", "Time a call waited in the service before a worker got it",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "vault_compute_seconds", "Time from dispatch to the worker's answer",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "vault_batch_size", "Rows per worker call that succeeded", ["model"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.instances = Gauge(
            "vault_instances", "Worker processes by state", ["model", "state"], registry=r
        )
        self.restarts = Counter(
            "vault_worker_restarts",
            "Worker processes restarted after a crash, or started in the place of one found stuck",
            ["model"],
            registry=r,
        )  # fmt: skip
        self.inflight = Gauge("vault_inflight", "Calls queued or running", ["model"], registry=r)
        self.model_ready = Gauge(
            "vault_model_ready", "1 while the model has a ready worker, else 0", ["model"],
            registry=r,
        )  # fmt: skip
        self.handshakes_refused = Counter(
            "vault_handshakes_refused",
            "CURVE handshakes the service refused, by reason: the key server's code for the "
            "caller's key (licence_unknown, licence_revoked, licence_expired, ...), "
            "keyserver_unavailable, probe_budget (the address's unknown keys past its budget), "
            "not_allowed (not on --allow)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.door_errors = Counter(
            "vault_door_errors",
            "Error answers the Open Inference Protocol doors sent, by door (rest, grpc) and "
            "code (the vault's error code, or HTTP's own: not_found...): refusals before any call was "
            "admitted (no token, no room, bad input...) are counted here only; errors the "
            "service answered for an admitted call are in vault_requests_total too",
            ["door", "code"], registry=r,
        )  # fmt: skip
        self._answered: dict[tuple[str, str, str], Any] = {}
        self._per_model: dict[str, tuple[Any, Any, Any, Any]] = {}

    def answered(self, model: str, licence: str, code: str) -> None:
        key = (model, licence, code)
        child = self._answered.get(key)
        if child is None:  # a labels() lookup takes a lock and builds a tuple: once per key
            outcome = "success" if code == "ok" else "failure"
            child = self._answered[key] = self.requests.labels(model, licence, outcome, code)
        child.inc()

    def per_model(self, model: str) -> tuple[Any, Any, Any, Any]:
        """(queue_seconds, compute_seconds, batch_size, inflight) children of ``model``."""
        got = self._per_model.get(model)
        if got is None:
            got = self._per_model[model] = (
                self.queue_seconds.labels(model),
                self.compute_seconds.labels(model),
                self.batch_size.labels(model),
                self.inflight.labels(model),
            )
        return got

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DataPlane(Protocol):
    """What the HTTP endpoints ask the service (``WorkerService``)."""

    def live(self) -> bool: ...
    def ready(self) -> bool: ...
    def model_ready(self, model: str, version: str | None = None) -> bool: ...
    def model_state(self, model: str) -> tuple[str, tuple[str, str] | None] | None: ...


_MODEL_READY = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/ready")


class HttpEndpoints:
    """A small threaded HTTP server for probes and scraping.

    ``/healthz`` and ``/readyz`` answer 200 or 503 (plain text, as before);
    the Open Inference Protocol's health endpoints answer 200 for true and
    4xx for false, as its specification and Triton do (400 not ready, 404 a
    model or version not served here), with a small JSON body."""

    def __init__(
        self,
        metrics: Metrics,
        plane: DataPlane,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = urllib.parse.unquote(self.path.split("?", 1)[0])
                plane = owner.plane
                if path == "/metrics":
                    self._send(200, owner.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = plane.live()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n")
                elif path == "/readyz":
                    ok = plane.ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                elif path == "/v2/health/live":
                    ok = plane.live()
                    self._json(200 if ok else 400, {"live": ok})
                elif path == "/v2/health/ready":
                    ok = plane.ready()
                    self._json(200 if ok else 400, {"ready": ok})
                elif m := _MODEL_READY.fullmatch(path):
                    self._model_ready(m.group(1), m.group(2))
                else:
                    self._send(404, b"not found\n")

            def _model_ready(self, model: str, version: str | None) -> None:
                plane = owner.plane
                state = plane.model_state(model)
                if state is None or version not in (None, "", "1"):
                    # the words and code of the protocol's doors (docs/protocol.md)
                    text = (f"no model {shown(model)} is served here" if state is None else
                            f"model {shown(model)} has no version {shown(version)} (only 1)")  # fmt: skip
                    self._json(404, {"error": f"[unknown_model] {text}", "code": "unknown_model"})
                    return
                ok = plane.model_ready(model, version)
                body: dict[str, Any] = {"name": model, "version": "1", "ready": ok,
                                        "state": state[0]}  # fmt: skip
                if state[1] is not None:
                    body["reason"] = {"code": state[1][0], "message": state[1][1]}
                self._json(200 if ok else 400, body)

            def _json(self, status: int, body: dict[str, Any]) -> None:
                self._send(status, json.dumps(body).encode() + b"\n", "application/json")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # probes every few seconds would drown the JSON log

        self.metrics = metrics
        self.plane = plane
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> HttpEndpoints:
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
            name="vault-http", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(2)

"""Serve the Open Inference Protocol beside the ZeroMQ front: the REST door
on uvicorn and the gRPC door on ``grpc.aio``, each in its own thread and
event loop, both onto the service's one data plane.

TLS: ``tls=(cert_file, key_file)`` serves both doors over TLS. Without it,
the doors bind only to a loopback address; any other address is refused at
start (:class:`~vault.core.errors.ConfigError`) unless
``dangerously_allow_plaintext=True`` (the CLI's
``--dangerously-serve-plaintext``): a bearer token sent in the clear is a
token given away.

Bounds (what a stranger can make the doors hold): each door holds at most
``max_inflight`` inference requests at once (vetting, reading, computing; a
typed 503 / ``UNAVAILABLE`` past it), reads a request's body or message only
once its token is vetted and within ``body_timeout``; uvicorn takes at most
``max_connections`` connections and tasks (its own 503 past it), at most
``max_connections_per_address`` of one peer address, closes a connection
whose request head has not arrived within ``head_timeout`` (``httpconn.py``)
and idle keep-alive connections after 5 s; the gRPC server runs at most
``max_connections`` RPCs at once (``RESOURCE_EXHAUSTED`` past it).

Example::

    edge = OipServer(service, OipConfig(host="0.0.0.0", http_port=8000, grpc_port=8001,
                                        tls=("cert.pem", "key.pem")))
    edge.start()          # binds; the ports are edge.http_port, edge.grpc_port
    edge.stop()
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from vault.core.errors import ConfigError
from vault.core.files import check_secret_file

from .door import DataPlane, Plane

__all__ = ["OipConfig", "OipServer", "is_loopback"]


@dataclass
class OipConfig:
    host: str = "127.0.0.1"
    http_port: int | None = None
    grpc_port: int | None = None
    tls: tuple[str, str] | None = None  # (certificate chain PEM, private key PEM)
    dangerously_allow_plaintext: bool = False
    max_message: int = 1 << 30
    cors_origins: tuple[str, ...] = ()  # web pages that may call the REST door (cors.py)
    max_inflight: int = 64  # inference requests each door holds at once
    max_connections: int = 512  # uvicorn's connections and tasks; gRPC's RPCs at once
    body_timeout: float = 30.0  # seconds for a vetted request's body (or message) to arrive
    head_timeout: float = 10.0  # seconds for each REST request's head (httpconn.py)
    max_connections_per_address: int = 64  # REST connections one peer address holds at once


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _new_loop(http: Any = None) -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed; ``http`` (the REST door's
    protocol class, over TLS): a loop that counts and times connections from
    before their handshake (:func:`.httpconn.gated_loop`)."""
    base: type[Any]
    try:
        import uvloop

        base = uvloop.Loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        base = asyncio.SelectorEventLoop
    if http is None:
        return base()
    from .httpconn import gated_loop

    return gated_loop(base, http)()  # type: ignore[no-any-return]


class _ToServiceLog(logging.Handler):
    """uvicorn's own log records as the service's JSON events (``http_door``)."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.WARNING)
        self._vault_log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            # the text only: a caller's bytes never reach the log (uvicorn's
            # messages name no request data at warning level and above)
            self._vault_log("http_door", level=level, message=record.getMessage()[:300])
        except Exception:  # noqa: BLE001 - logging never takes the door down
            self.handleError(record)


def _route_uvicorn_logs(log: Any) -> None:
    """uvicorn's loggers write through the service's log (its stderr is one
    JSON event per line; uvicorn's own handler wrote `WARNING:  Invalid HTTP
    request received.` there, which a caller's bad request triggers), or
    nowhere when there is none."""
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, _ToServiceLog):
                lg.removeHandler(h)
        lg.addHandler(_ToServiceLog(log) if log is not None else logging.NullHandler())
        lg.propagate = False


class OipServer:
    """See the module docstring."""

    def __init__(self, service: Plane, cfg: OipConfig) -> None:
        self.check(cfg)
        self.cfg = cfg
        self.plane = DataPlane(service)
        self._log = getattr(service, "log", None)  # the service's JSON log, where it has one
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._threads: list[threading.Thread] = []
        self._uvicorn: Any = None
        self._grpc: Any = None
        self._grpc_loop: asyncio.AbstractEventLoop | None = None
        self._grpc_done: asyncio.Event | None = None

    @staticmethod
    def check(cfg: OipConfig) -> None:
        """Refuse a configuration that would serve tokens in the clear (or
        names unreadable TLS files), before anything starts."""
        if cfg.http_port is None and cfg.grpc_port is None:
            raise ConfigError("give --http PORT, --grpc PORT or both")
        if cfg.tls is None and not is_loopback(cfg.host) and not cfg.dangerously_allow_plaintext:
            raise ConfigError(
                f"the Open Inference Protocol on {cfg.host} would carry bearer tokens in the "
                "clear: give --tls-cert and --tls-key, bind a loopback address, or (behind a "
                "proxy that terminates TLS) --dangerously-serve-plaintext"
            )
        if cfg.tls is not None:
            try:
                with open(cfg.tls[0], "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{cfg.tls[0]}: cannot read ({exc.strerror})") from exc
            # the private key is a secret: this user's, 0600, in a directory of its own
            check_secret_file(cfg.tls[1], what="TLS private key")

    # -- start ---------------------------------------------------------------------

    def start(self) -> None:
        try:
            if self.cfg.http_port is not None:
                self._start_http()
            if self.cfg.grpc_port is not None:
                self._start_grpc()
        except BaseException:
            self.stop()
            raise

    def _start_http(self) -> None:
        import uvicorn

        from .httpconn import bounded_protocol
        from .rest import RestApp

        host = self.cfg.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(self.cfg.http_port or 0)))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"--http {host}:{self.cfg.http_port}: {exc.strerror}") from exc
        sock.listen(1024)
        sock.setblocking(False)
        self.http_port = int(sock.getsockname()[1])
        tls = self.cfg.tls
        app: Any = RestApp(self.plane, max_body=self.cfg.max_message,
                           max_inflight=self.cfg.max_inflight,
                           body_timeout=self.cfg.body_timeout)  # fmt: skip
        if self.cfg.cors_origins:
            from .cors import with_cors

            app = with_cors(app, self.cfg.cors_origins)
        http = bounded_protocol(self.cfg.head_timeout, self.cfg.max_connections_per_address)
        _route_uvicorn_logs(self._log)
        config = uvicorn.Config(
            app, lifespan="off", log_config=None,
            log_level="warning", access_log=False, ws="none",
            http=http,
            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
            timeout_graceful_shutdown=5, server_header=False, date_header=False,
            limit_concurrency=self.cfg.max_connections, timeout_keep_alive=5,
        )  # fmt: skip
        try:
            config.load()  # the TLS files are read here: a bad one fails the start
        except Exception as exc:
            sock.close()
            raise ConfigError(f"the REST door cannot start ({type(exc).__name__}: {exc})") from exc
        server = uvicorn.Server(config)
        self._uvicorn = server
        started: Future[None] = Future()

        def run() -> None:
            loop = _new_loop(http if tls else None)
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve_http(server, sock, started))
            finally:
                sock.close()
                loop.close()

        t = threading.Thread(target=run, name="vault-oip-http", daemon=True)
        t.start()
        self._threads.append(t)
        started.result(timeout=30)

    async def _serve_http(self, server: Any, sock: socket.socket, started: Future[None]) -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.005)
        if not started.done():
            started.set_result(None)
        try:
            await task
        finally:
            abort = getattr(asyncio.get_running_loop(), "abort_handshakes", None)
            if abort is not None:
                abort()  # connections still shaking hands go with the door

    def _start_grpc(self) -> None:
        started: Future[int] = Future()

        def run() -> None:
            loop = asyncio.new_event_loop()  # grpc.aio keeps to the standard loop
            asyncio.set_event_loop(loop)
            self._grpc_loop = loop
            try:
                loop.run_until_complete(self._serve_grpc(started))
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
            finally:
                loop.close()

        t = threading.Thread(target=run, name="vault-oip-grpc", daemon=True)
        t.start()
        self._threads.append(t)
        self.grpc_port = started.result(timeout=30)

    async def _serve_grpc(self, started: Future[int]) -> None:
        import grpc

        from .door import Gate
        from .grpc_door import InferenceServicer, register

        limit = min(self.cfg.max_message, (1 << 31) - 1)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # never share the port with another server
                # compressed messages refused (UNIMPLEMENTED): the size a message
                # may take once decompressed is bounded by nothing the caller
                # sent (a megabyte of gzip is a gigabyte of BYTES elements)
                ("grpc.compression_enabled_algorithms_bitset", 1),
                # a connection's handshake (TLS, HTTP/2's preface) within the
                # REST door's head deadline, not gRPC's default 120 s: a
                # stranger's silent connections are not held for two minutes
                ("grpc.server_handshake_timeout_ms", int(self.cfg.head_timeout * 1000)),
                # no window growth by bandwidth probing: a stream whose message
                # the door has not asked for holds HTTP/2's initial window, not
                # megabytes (20 unread 16 MiB messages: +180 MiB with it, +2
                # without; a message being read still gets a window of its size:
                # 256 MiB read in 0.55 s against 0.62-0.70 over loopback, by hand)
                ("grpc.http2.bdp_probe", 0),
            ],
            maximum_concurrent_rpcs=self.cfg.max_connections,
        )
        register(InferenceServicer(self.plane,
                                   gate=Gate(self.cfg.max_inflight, bytes_per_licence=limit),
                                   body_timeout=self.cfg.body_timeout,
                                   head_timeout=self.cfg.head_timeout,
                                   per_address=self.cfg.max_connections_per_address), server)  # fmt: skip
        host = self.cfg.host
        addr = (
            f"[{host.strip('[]')}]:{self.cfg.grpc_port}"
            if ":" in host
            else f"{host}:{self.cfg.grpc_port}"
        )
        try:
            if self.cfg.tls is not None:
                with open(self.cfg.tls[0], "rb") as fh:
                    cert = fh.read()
                with open(self.cfg.tls[1], "rb") as fh:
                    key = fh.read()
                port = server.add_secure_port(addr, grpc.ssl_server_credentials([(key, cert)]))
            else:
                port = server.add_insecure_port(addr)
        except Exception as exc:  # grpc raises RuntimeError for a port it cannot bind
            raise ConfigError(f"--grpc {addr}: cannot bind ({exc})") from exc
        if not port:
            raise ConfigError(f"--grpc {addr}: cannot bind")
        await server.start()
        self._grpc = server
        self._grpc_done = asyncio.Event()
        started.set_result(port)
        await self._grpc_done.wait()
        await server.stop(grace=5)

    # -- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop both doors (calls already answered are sent first; idempotent)."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        loop, done = self._grpc_loop, self._grpc_done
        if loop is not None and done is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # the loop already closed
                pass
        for t in self._threads:
            t.join(15)
        self._threads.clear()

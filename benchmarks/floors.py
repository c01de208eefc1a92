"""The floors: what moving the same bytes costs with nothing else around it.

:class:`EchoServer` is one separate process answering three ways, each
replying with exactly ``reply_size`` bytes to a request of any size:

* a raw pyzmq ROUTER on ``ipc://`` (what a local worker uses),
* a raw pyzmq ROUTER on ``tcp://127.0.0.1`` with CURVE (what a remote
  worker uses; the handshake is not timed, only the encrypted frames), and
  one without (the difference is what CURVE's encryption costs),
* a raw ``AF_UNIX`` stream socket (length-prefixed, ``recv_into``
  preallocated buffers: the cheapest local round trip Python can do).

Clients use the same socket options as ``vault.client`` (DEALER, zero-copy
frames). :func:`memcpy_fn` is a plain ``numpy.copyto`` of the same bytes into
preallocated buffers: the cost of touching the bytes once.

Example::

    with EchoServer() as es:
        f = es.zmq_ipc_fn(6 << 20, 6 << 20)
        f()       # one round trip
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from .harness import die_with_parent

_HDR = struct.Struct("<QQ")  # request payload size, reply size


_SEALED_SID = b"bench-session-01"


def _sealed_keys() -> tuple[bytes, bytes]:
    """Fixed session keys for the sealed echo (a floor, not a secret)."""
    from vault.core.sealed import derive_keys

    return derive_keys(b"c" * 32, b"s" * 32, _SEALED_SID, b"C" * 40, b"S" * 40)


def _stream_echo(conn: Any, reply: Callable[[int], bytes]) -> None:  # pragma: no cover - child
    """Length-prefixed echo on a stream socket (TCP, TLS): read n bytes, answer m."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    hdr = bytearray(_HDR.size)
    try:
        while True:
            got = 0
            while got < _HDR.size:
                k = conn.recv_into(memoryview(hdr)[got:])
                if not k:
                    return
                got += k
            n, m = _HDR.unpack(hdr)
            if n > len(buf):
                buf = bytearray(n)
                view = memoryview(buf)
            got = 0
            while got < n:
                k = conn.recv_into(view[got:n])
                if not k:
                    return
                got += k
            conn.sendall(reply(m))
    except OSError:
        return
    finally:
        conn.close()


def _stream_server(
    sock: Any, wrap: Callable[[Any], Any], reply: Callable[[int], bytes]
) -> None:  # pragma: no cover
    while True:
        conn, _ = sock.accept()
        try:
            conn = wrap(conn)
        except OSError:
            conn.close()
            continue
        threading.Thread(target=_stream_echo, args=(conn, reply), daemon=True).start()


def _serve(
    ipc: str, tcp: str, unix_path: str, secret: bytes, public: bytes, cert: str, key: str
) -> None:  # pragma: no cover - child
    ctx = zmq.Context()
    socks = []
    a = ctx.socket(zmq.ROUTER)
    a.bind(ipc)
    socks.append(a)
    b = ctx.socket(zmq.ROUTER)
    b.curve_server = True
    b.curve_secretkey = secret
    b.curve_publickey = public
    b.bind(tcp)
    socks.append(b)
    c = ctx.socket(zmq.ROUTER)  # tcp without CURVE: what the encryption costs, by difference
    c.bind(tcp)
    socks.append(c)
    d = ctx.socket(zmq.ROUTER)  # tcp, frames sealed with AES-256-GCM (vault/core/sealed.py)
    d.bind(tcp)
    socks.append(d)
    from vault.core.sealed import Opener, Sealer

    c2s, s2c = _sealed_keys()
    sealed_peers: dict[bytes, tuple[Any, Any]] = {}
    replies: dict[int, bytes] = {}

    def reply(n: int) -> bytes:
        r = replies.get(n)
        if r is None:
            r = replies[n] = bytes(n)
        return r

    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(unix_path)
    lsock.listen(4)

    def unix_conn(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        hdr = bytearray(_HDR.size)
        try:
            while True:
                if conn.recv_into(hdr, _HDR.size, socket.MSG_WAITALL) < _HDR.size:
                    break
                n, m = _HDR.unpack(hdr)
                if n > len(buf):
                    buf = bytearray(n)
                    view = memoryview(buf)
                got = 0
                while got < n:
                    k = conn.recv_into(view[got:n])
                    if not k:
                        return  # peer gone mid-message
                    got += k
                conn.sendall(reply(m))
        finally:
            conn.close()

    def unix_loop() -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=unix_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=unix_loop, daemon=True).start()
    # plain TCP and TLS 1.3 stream echoes: what TLS's encryption costs, by difference
    import ssl

    tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ctx.load_cert_chain(cert, key)
    ports = []
    for wrap in (lambda x: x, lambda x: tls_ctx.wrap_socket(x, server_side=True)):
        ls = socket.create_server(("127.0.0.1", 0))
        ports.append(ls.getsockname()[1])
        threading.Thread(target=_stream_server, args=(ls, wrap, reply), daemon=True).start()
    sys.stdout.write(
        f"{a.getsockopt_string(zmq.LAST_ENDPOINT)} {b.getsockopt_string(zmq.LAST_ENDPOINT)} "
        f"{c.getsockopt_string(zmq.LAST_ENDPOINT)} {d.getsockopt_string(zmq.LAST_ENDPOINT)} "
        f"{ports[0]} {ports[1]}\n"
    )
    sys.stdout.flush()
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    while True:
        for s, _ in poller.poll():
            msg = s.recv_multipart(copy=False)
            if s is d:
                ident = msg[0].bytes
                if ident not in sealed_peers:
                    sealed_peers[ident] = (
                        Opener(c2s, _SEALED_SID, reuse=True),
                        Sealer(s2c, _SEALED_SID),
                    )
                opener, sealer = sealed_peers[ident]
                hdr = opener.open(msg[1:])[0]
                n, m = _HDR.unpack(hdr)
                s.send_multipart([msg[0], *sealer.seal([hdr, reply(m)])])
                opener.release()  # answered: its buffer may take the next message
                continue
            n, m = _HDR.unpack(msg[1].bytes)
            s.send_multipart([msg[0], msg[1], reply(m)], copy=False)


class EchoServer:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="vault-echo-")  # 0700, as the worker's
        self.public, secret = zmq.curve_keypair()
        self.unix_path = os.path.join(self.dir, "u.sock")
        code = (
            "import sys; from benchmarks.floors import _serve; "
            "_serve(*sys.argv[1:4], sys.argv[4].encode(), sys.argv[5].encode(), *sys.argv[6:])"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        from .fastapi_host import _self_signed

        self.cert, key = _self_signed(self.dir)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, f"ipc://{self.dir}/z.sock", "tcp://127.0.0.1:*", self.unix_path,
             secret.decode(), self.public.decode(), self.cert, key],
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": root}, text=True,
            preexec_fn=die_with_parent)  # fmt: skip
        assert self.proc.stdout is not None
        (self.ipc, self.tcp, self.tcp_plain, self.tcp_sealed, tcp_port,
         tls_port) = self.proc.stdout.readline().split()  # fmt: skip
        self.tcp_port, self.tls_port = int(tcp_port), int(tls_port)
        self.pid = self.proc.pid
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._closers: list[Callable[[], None]] = []

    def _zmq_fn(self, endpoint: str, n_in: int, n_out: int, curve: bool) -> Callable[[], Any]:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        if curve:
            s.curve_serverkey = self.public
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.connect(endpoint)
        self._closers.append(s.close)
        payload = np.random.default_rng(0).standard_normal(max(1, n_in // 4)).astype(np.float32)
        hdr = _HDR.pack(payload.nbytes, n_out)

        def call() -> Any:
            s.send_multipart([hdr, payload], copy=False)
            r = s.recv_multipart(copy=False)
            return np.frombuffer(r[1].buffer, np.uint8)

        call()  # connect (and CURVE handshake) before timing
        return call

    def zmq_ipc_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        return self._zmq_fn(self.ipc, n_in, n_out, curve=False)

    def zmq_tcp_curve_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        return self._zmq_fn(self.tcp, n_in, n_out, curve=True)

    def zmq_tcp_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        """tcp without CURVE (never a vault path: the CURVE row minus this one
        is what encrypting the frames costs)."""
        return self._zmq_fn(self.tcp_plain, n_in, n_out, curve=False)

    def zmq_tcp_sealed_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        """tcp without CURVE, both ways sealed with AES-256-GCM as the vault's
        remote calls are (vault/core/sealed.py): this row minus ``zmq_echo_tcp``
        is what sealing costs, against ``tls_echo - tcp_echo``."""
        from vault.core.sealed import Opener, Sealer

        c2s, s2c = _sealed_keys()
        sealer, opener = Sealer(c2s, _SEALED_SID), Opener(s2c, _SEALED_SID)
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.copy_threshold = (256 << 10) + 4096
        s.connect(self.tcp_sealed)
        self._closers.append(s.close)
        payload = np.random.default_rng(0).standard_normal(max(1, n_in // 4)).astype(np.float32)
        hdr = _HDR.pack(payload.nbytes, n_out)

        def call() -> Any:
            s.send_multipart(sealer.seal([hdr, payload]), copy=False)
            return opener.open(s.recv_multipart(copy=False))[1]

        call()
        return call

    def _stream_fn(self, port: int, n_in: int, n_out: int, tls: bool) -> Callable[[], Any]:
        c: Any = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            import ssl

            ctx = ssl.create_default_context(cafile=self.cert)
            c = ctx.wrap_socket(c, server_hostname="127.0.0.1")
        return self._echo_call(c, n_in, n_out)

    def tcp_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        """A plain TCP stream echo (Python sockets): the baseline of ``tls_fn``."""
        return self._stream_fn(self.tcp_port, n_in, n_out, tls=False)

    def tls_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        """The same echo over TLS 1.3 (Python's ssl, OpenSSL's AES-GCM):
        this row minus ``tcp_echo`` is what TLS costs for the same bytes."""
        return self._stream_fn(self.tls_port, n_in, n_out, tls=True)

    def unix_fn(self, n_in: int, n_out: int) -> Callable[[], Any]:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(self.unix_path)
        return self._echo_call(c, n_in, n_out)

    def _echo_call(self, c: Any, n_in: int, n_out: int) -> Callable[[], Any]:
        """One echo call on the connected stream ``c`` (closed with the rest):
        ``n_in`` bytes out, ``n_out`` back; warmed once."""
        self._closers.append(c.close)
        payload = np.random.default_rng(0).standard_normal(max(1, n_in // 4)).astype(np.float32)
        hdr = _HDR.pack(payload.nbytes, n_out)
        buf = bytearray(max(1, n_out))
        view = memoryview(buf)

        def call() -> Any:
            c.sendall(hdr)
            c.sendall(payload)
            got = 0
            while got < n_out:
                got += c.recv_into(view[got:n_out])
            return buf

        call()
        return call

    def close(self) -> None:
        for c in self._closers:
            c()
        self.ctx.term()
        self.proc.kill()
        self.proc.wait()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memcpy_fn(n_in: int, n_out: int) -> Callable[[], Any]:
    """Copy ``n_in`` then ``n_out`` bytes into preallocated buffers (the bytes touched once each way)."""
    src_i = np.random.default_rng(0).integers(0, 255, max(1, n_in), dtype=np.uint8)
    src_o = np.random.default_rng(1).integers(0, 255, max(1, n_out), dtype=np.uint8)
    dst_i = np.empty_like(src_i)
    dst_o = np.empty_like(src_o)

    def call() -> None:
        np.copyto(dst_i, src_i)
        np.copyto(dst_o, src_o)

    call()
    return call

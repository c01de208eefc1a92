"""The process boundary's own floor: plain onnxruntime in another process,
reached over a raw Unix stream socket with the least protocol there is.

Why. ``vault / in-process`` mixes two costs: what the vault's own code adds
(its codec, checks, channel, licence) and what *any* design pays once the
model runs in a process other than the caller's: the request's bytes come
from another core's cache, both processes sleep and wake for every call,
onnxruntime's run starts from a thread that just woke. The raw echoes of the
latency section time the second part without a model; this server times it
with one.

What it is: a child process (``python -m benchmarks.raw_server``, no vault
code in it) that builds the session with the worker's own options
(:func:`~benchmarks.harness.ort_session`) and serves one thread per
connection. The protocol knows every shape in advance (fixed by the
benchmark's feeds, told once at start), and moves the bytes one of two ways:

* ``socket``: a request is the input arrays' bytes back to back, sent with
  one ``sendmsg`` straight from the caller's arrays and read into
  preallocated arrays; the answer is the outputs' bytes, read into fresh
  arrays the caller keeps (as ``InferenceSession.run`` gives fresh ones);
* ``shm``: the connection's caller shares a ``memfd`` (``SCM_RIGHTS``); it
  copies the inputs in and sends one byte, the server runs on views of
  them, copies the outputs in after them and answers one byte, and the
  caller copies the outputs out into fresh arrays: the vault's own data
  path for large tensors (one copy each way), with nothing else around it.

No header, no names, no checks, no encryption: more favourable than any
protocol that can serve more than one fixed shape, so a design that reaches
it has nothing left to remove but the process boundary itself.

Example::

    fn, close = start(model_bytes, feeds)
    outs = fn()                 # one call: a list of arrays, as sess.run(None, feeds)
    close()
"""

from __future__ import annotations

import json
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

from .harness import die_with_parent

_LEN = struct.Struct("<Q")


def _bytes(a: Any) -> memoryview:
    """An array's bytes, as a flat view (no copy)."""
    return memoryview(a).cast("B")


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if not r:
            return False
        got += r
    return True


def _layout(spec: list[Any]) -> list[int]:
    """Offsets of the arrays ``spec`` names, back to back, each 64-byte aligned."""
    offs, at = [], 0
    for _, dtype, shape in spec:
        offs.append(at)
        at += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // 64) * 64
    offs.append(at)
    return offs


def _arrays(buf: Any, spec: list[Any], offs: list[int]) -> list[np.ndarray]:
    return [np.ndarray(shape, dtype, buf, off) for (_, dtype, shape), off in zip(spec, offs)]


def _serve_conn(sess: Any, conn: socket.socket, spec: dict[str, Any], fd: int | None) -> None:
    inputs = spec["inputs"]
    names = [name for name, _, _ in inputs]
    try:
        if fd is None:  # preallocated inputs, read in place; outputs sent from onnxruntime's arrays
            arrays = [np.empty(shape, dtype) for _, dtype, shape in inputs]
            views = [_bytes(a) for a in arrays]
            feeds = dict(zip(names, arrays))
            while True:
                for v in views:
                    if not _recv_exact(conn, v):
                        return
                outs = sess.run(None, feeds)
                conn.sendmsg([_bytes(np.ascontiguousarray(o)) for o in outs])
        import mmap

        whole = inputs + spec["outputs"]
        offs = _layout(whole)
        mm = mmap.mmap(fd, offs[-1])
        arrays = _arrays(mm, whole, offs)
        feeds = dict(zip(names, arrays[: len(inputs)]))
        targets = arrays[len(inputs) :]
        one = bytearray(1)
        while True:
            if not conn.recv_into(one, 1):
                return
            for dst, o in zip(targets, sess.run(None, feeds)):
                np.copyto(dst, o)
            conn.send(b"k")
    except OSError:
        return
    finally:
        conn.close()


def _child(path: str, model_path: str) -> None:  # pragma: no cover - runs in the child
    from .harness import ort_session

    with open(model_path, "rb") as fh:
        sess = ort_session(fh.read())
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = lst.accept()
        n = _LEN.unpack(conn.recv(_LEN.size, socket.MSG_WAITALL))[0]
        msg, fds, _, _ = socket.recv_fds(conn, n, 1, socket.MSG_WAITALL)
        spec = json.loads(msg)
        fd = fds[0] if fds else None
        threading.Thread(target=_serve_conn, args=(sess, conn, spec, fd), daemon=True).start()


class _Client:
    """One connection (one per calling thread): sends the feeds, returns fresh outputs."""

    def __init__(
        self, path: str, feeds: dict[str, np.ndarray], ref: list[np.ndarray], shm: bool
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        spec = {
            "inputs": [[k, v.dtype.str, list(v.shape)] for k, v in feeds.items()],
            "outputs": [["", o.dtype.str, list(o.shape)] for o in ref],
        }
        msg = json.dumps(spec).encode()
        self.sock.sendall(_LEN.pack(len(msg)))
        self.mm: Any = None
        if shm:
            import mmap

            whole = spec["inputs"] + spec["outputs"]
            offs = _layout(whole)
            fd = os.memfd_create("raw-bench", os.MFD_CLOEXEC)
            os.ftruncate(fd, offs[-1])
            self.mm = mmap.mmap(fd, offs[-1])
            socket.send_fds(self.sock, [msg], [fd])
            os.close(fd)
            arrays = _arrays(self.mm, whole, offs)
            self.slots = arrays[: len(feeds)]
            self.out_slots = arrays[len(feeds) :]
            self.src = list(feeds.values())
            self.call = self._call_shm  # type: ignore[method-assign]
        else:
            self.sock.sendall(msg)
        self.feeds = [_bytes(np.ascontiguousarray(v)) for v in feeds.values()]
        self.outs = [(o.shape, o.dtype) for o in ref]
        self.one = bytearray(1)

    def call(self) -> list[np.ndarray]:
        self.sock.sendmsg(self.feeds)
        outs = []
        for shape, dtype in self.outs:
            a = np.empty(shape, dtype)
            if not _recv_exact(self.sock, _bytes(a)):
                raise ConnectionError("the raw server closed the connection")
            outs.append(a)
        return outs

    def _call_shm(self) -> list[np.ndarray]:
        for dst, src in zip(self.slots, self.src):
            np.copyto(dst, src)
        self.sock.send(b"g")
        if not self.sock.recv_into(self.one, 1):
            raise ConnectionError("the raw server closed the connection")
        return [o.copy() for o in self.out_slots]


def start(
    model: bytes, feeds: dict[str, np.ndarray], ref: list[np.ndarray], *, shm: bool = False
) -> tuple[Callable[[], list[np.ndarray]], Callable[[], None]]:
    """Start the server for ``model`` (whose outputs for ``feeds`` are ``ref``,
    fixing their shapes); a call function over one connection, and a stop
    function. ``shm``: the bytes move through shared memory, not the socket."""
    fn, close, _ = _start(model, feeds, ref, shm)
    return fn, close


def _start(
    model: bytes, feeds: dict[str, np.ndarray], ref: list[np.ndarray], shm: bool
) -> tuple[Callable[[], list[np.ndarray]], Callable[[], None], Callable[[], Callable[[], Any]]]:
    d = tempfile.mkdtemp(prefix="vault-bench-raw-")
    model_path, path = os.path.join(d, "m.onnx"), os.path.join(d, "s.sock")
    with open(model_path, "wb") as fh:
        fh.write(model)
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.raw_server", path, model_path],
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    clients: list[_Client] = []

    def close() -> None:
        for c in clients:
            c.sock.close()
        proc.kill()
        proc.wait()
        for f in (path, model_path):
            try:
                os.unlink(f)
            except OSError:
                pass
        os.rmdir(d)

    if line.strip() != b"ready":
        close()
        raise RuntimeError(f"raw server did not start: {line!r}")

    def connector() -> Callable[[], Any]:
        c = _Client(path, feeds, ref, shm)
        clients.append(c)
        return c.call

    try:
        first = connector()
        got = first()
    except BaseException:
        close()
        raise
    if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, ref)):
        close()
        raise RuntimeError("the raw server's outputs differ from the in-process session's")
    return first, close, connector


def per_thread(
    model: bytes, feeds: dict[str, np.ndarray], ref: list[np.ndarray], *, shm: bool = False
) -> tuple[Callable[[], Any], Callable[[], None]]:
    """For many calling threads: a call function that gives each thread its
    own connection (made on its first call), and a stop function."""
    _, close, connector = _start(model, feeds, ref, shm)
    tls = threading.local()

    def call() -> Any:
        fn = getattr(tls, "fn", None)
        if fn is None:
            fn = tls.fn = connector()
        return fn()

    return call, close


if __name__ == "__main__":  # pragma: no cover
    _child(sys.argv[1], sys.argv[2])

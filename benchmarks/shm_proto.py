"""Prototype: a shared-memory data path for a local worker (benchmark only).

ZeroMQ carries only a tiny control message; the tensors live in one memfd
that both processes map. The server (a second process running onnxruntime)
binds its input and output with IO binding directly onto the shared pages,
so onnxruntime reads the request and writes the reply in place: no frame is
copied by ZeroMQ, no socket carries megabytes.

Two client variants are timed:

* ``copy``: the caller's array is copied into the shared input region and the
  result copied out (drop-in for today's ``compute``: the caller owns the
  result; one memcpy each way);
* ``zero_copy``: the caller writes its input straight into the shared region
  (an ``input_buffer()`` API) and gets a read-only view of the output, valid
  until its next call.

This is a prototype for measurement: no sealing, no licence, no hardening;
the worker itself is not changed.

Example::

    with ShmServer(model_bytes, "x", "logits", shape) as s:
        out = s.call_copy(x)
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import zmq

from .harness import die_with_parent

_ALIGN = 4096


def _serve(
    fd: int, model_path: str, inp: str, out: str, shape: list[int], endpoint: str
) -> None:  # pragma: no cover
    import onnxruntime as ort

    n = int(np.prod(shape)) * 4
    off = (n + _ALIGN - 1) // _ALIGN * _ALIGN
    mm = mmap.mmap(fd, off * 2)
    iv = np.frombuffer(mm, np.float32, int(np.prod(shape)), 0).reshape(shape)
    ov = np.frombuffer(mm, np.float32, int(np.prod(shape)), off).reshape(shape)
    so = ort.SessionOptions()  # as the worker: thread-pool spinning off
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    b = sess.io_binding()
    b.bind_input(inp, "cpu", 0, np.float32, shape, iv.ctypes.data)
    b.bind_output(out, "cpu", 0, np.float32, shape, ov.ctypes.data)
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        ident, ctl = s.recv_multipart()
        if ctl == b"stop":
            break
        sess.run_with_iobinding(b)
        s.send_multipart([ident, b"ok"])


class ShmServer:
    def __init__(self, model_bytes: bytes, inp: str, out: str, shape: list[int]) -> None:
        self.shape = shape
        n = int(np.prod(shape)) * 4
        off = (n + _ALIGN - 1) // _ALIGN * _ALIGN
        self.dir = tempfile.mkdtemp(prefix="vault-shm-")
        self.model_path = os.path.join(self.dir, "m.onnx")
        with open(self.model_path, "wb") as fh:
            fh.write(model_bytes)
        self.fd = os.memfd_create("vault-tensors")
        os.ftruncate(self.fd, off * 2)
        self.mm = mmap.mmap(self.fd, off * 2)
        count = int(np.prod(shape))
        self.iv = np.frombuffer(self.mm, np.float32, count, 0).reshape(shape)
        self.ov = np.frombuffer(self.mm, np.float32, count, off).reshape(shape)
        self.ov.flags.writeable = False
        endpoint = f"ipc://{self.dir}/c.sock"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            "import sys, json; from benchmarks.shm_proto import _serve; "
            "_serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]), sys.argv[6])"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(self.fd), self.model_path, inp, out, str(list(shape)), endpoint],
            pass_fds=[self.fd], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": root},
            preexec_fn=die_with_parent)  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("shm prototype server did not start")
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def _roundtrip(self) -> None:
        self.sock.send(b"run")
        self.sock.recv()

    def input_buffer(self) -> np.ndarray:
        return self.iv

    def call_copy(self, x: np.ndarray) -> np.ndarray:
        np.copyto(self.iv, x)
        self._roundtrip()
        return self.ov.copy()

    def call_zero_copy(self) -> np.ndarray:
        self._roundtrip()
        return self.ov

    def close(self) -> None:
        self.sock.send(b"stop")
        self.sock.close()
        self.ctx.term()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        del self.iv, self.ov
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a zero-copy view: the mapping goes with it
            pass
        os.close(self.fd)
        os.unlink(self.model_path)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def __enter__(self) -> ShmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The isolated worker: the only process that ever holds a pipeline's plaintext.

Run it as ``python -m worker PACKAGE --licence FILE --endpoint ipc://DIR/w.sock``;
``vault.open()`` does that for you. Modules: :mod:`worker.hardening` (process
lock-down, stdlib + ctypes only), :mod:`worker.runtime` (onnxruntime sessions
from memory), :mod:`worker.ops` (the request operations), :mod:`worker.server`
(the ZeroMQ loop), :mod:`worker.lease` (key lease renewal).

This ``__init__`` imports nothing on purpose: hardening must run before numpy,
onnxruntime or zmq start any thread.

Example::

    $ python -m worker model.vault --licence alice.licence --endpoint ipc:///tmp/vault-x/w.sock
"""

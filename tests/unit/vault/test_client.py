"""vault.client against a live local worker: open, compute, errors, threads, crashes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import vault
from tests.models import classifier_pipeline, reference_pipeline
from tests.raw import Raw, raw_local, raw_zmq
from tests.sealed import Sealed, open_sealed, seal_for_test
from vault.client import Model
from vault.core.protocol import PROTOCOL_VERSION, pack_header


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    pre, model, post = classifier_pipeline()
    return seal_for_test(tmp_path_factory.mktemp("client"), model, pre=pre, post=post, name="clf")


@pytest.fixture(scope="module")
def model(sealed: Sealed) -> Iterator[Model]:
    m = open_sealed(sealed)
    try:
        yield m
    finally:
        m.close()


def _image(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 8), dtype=np.uint8)


def test_public_signature(model: Model) -> None:
    assert model.inputs == {"image": ("uint8", ("N", 8))}
    assert set(model.outputs) == {"probs", "top_values", "top_indices"}
    assert model.outputs["top_indices"][0] == "int64"


def test_compute_matches_plain_onnxruntime(model: Model) -> None:
    x = _image(5)
    got = model.compute({"image": x})
    want = reference_pipeline(list(classifier_pipeline()), {"image": x})
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6)
    only = model.compute({"image": x.tolist() and x}, outputs=["probs"])
    assert list(only) == ["probs"]


@pytest.mark.parametrize(
    "inputs, outputs, err",
    [
        ({"image": np.zeros((1, 8), np.float32)}, None, vault.InputError),
        ({"image": np.zeros((1, 9), np.uint8)}, None, vault.InputError),
        ({}, None, vault.InputError),
        ({"image": np.zeros((1, 8), np.uint8), "extra": np.zeros(1)}, None, vault.InputError),
        ({"image": np.zeros((1, 8), np.uint8)}, ["nosuch"], vault.InputError),
    ],
)
def test_bad_requests_raise_typed_errors(
    model: Model, inputs: dict, outputs: list | None, err: type
) -> None:
    with pytest.raises(err):
        model.compute(inputs, outputs)
    assert model.compute({"image": _image(1)})["probs"].shape == (1, 5)  # still serving


def test_internal_tensor_is_refused_like_an_unknown_name(model: Model) -> None:
    x = _image(1)
    with pytest.raises(vault.InputError) as internal:
        model.compute({"image": x}, outputs=["logits"])  # the model stage's output, inside
    with pytest.raises(vault.InputError) as unknown:
        model.compute({"image": x}, outputs=["zzzzzz"])
    assert type(internal.value) is type(unknown.value)
    assert str(internal.value).replace("logits", "?") == str(unknown.value).replace("zzzzzz", "?")


@pytest.mark.parametrize("front", [raw_zmq, raw_local], ids=["zmq", "local"])
def test_malformed_messages_get_typed_errors(
    model: Model, front: Callable[[Model], contextlib.AbstractContextManager[Raw]]
) -> None:
    """Both fronts of a local worker (ZeroMQ and the direct local channel)."""
    cases = [
        [b"\xc1garbage"],
        [pack_header({"v": PROTOCOL_VERSION + 7, "op": "info", "id": 1})],
        [pack_header({"v": PROTOCOL_VERSION, "op": "info", "id": 2}), b"extra"],
        [pack_header({"v": PROTOCOL_VERSION, "op": "compute", "id": 3,
                      "tensors": [{"name": "image", "dtype": "uint8", "shape": [1, 8]}]}), b"short"],
        [pack_header({"v": PROTOCOL_VERSION, "op": "compute", "id": 4,
                      "tensors": [{"name": "image", "dtype": "float128", "shape": [1]}]}), b"x" * 16],
        [pack_header({"v": PROTOCOL_VERSION, "op": "compute", "id": 5, "tensors": []}), b"a", b"b"],
        [pack_header({"v": PROTOCOL_VERSION, "op": "nope", "id": 6})],
    ]  # fmt: skip
    from vault.core.protocol import unpack_header

    codes = []
    with front(model) as call:  # the raw transport: send frames the client would never build
        for frames in cases:
            header = unpack_header(call(frames)[0])
            assert header["ok"] is False
            codes.append(header["error"]["code"])
    assert codes == [
        "protocol",
        "unsupported_version",
        "protocol",
        "protocol",
        "protocol",
        "protocol",
        "protocol",
    ]
    assert model.compute({"image": _image(1)})["probs"].shape == (1, 5)


def test_the_local_channel_answers_only_connections_with_the_callers_token(
    model: Model,
) -> None:
    """A process that can reach the caller's socket (its own uid) but holds no
    token gets no answer; the same request with the token is answered (control)."""
    import socket

    from vault.core.localwire import Closed, LocalChannel, RecordReader, send_record

    assert isinstance(model._channel, LocalChannel)
    request = [pack_header({"v": PROTOCOL_VERSION, "op": "info", "id": 1})]
    answers = {}
    for who, token in (("stranger", os.urandom(32)), ("caller", model._channel._token)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(model._channel.path)
            s.sendall(token)
            try:
                send_record(s, request)
                answers[who] = RecordReader(s, max_message=1 << 20, owned=True).read()
            except (Closed, OSError):
                answers[who] = None
    assert answers["stranger"] is None
    assert answers["caller"] is not None
    assert model.compute({"image": _image(1)})["probs"].shape == (1, 5)


def test_a_thread_per_call_does_not_pile_up_connections(model: Model) -> None:
    """A caller that makes a new thread for every call (a thread-per-request
    server) gets an answer every time: each thread's connection to the
    worker ends with the thread, so the worker's 256-connection cap is never
    reached."""
    import gc

    from vault.core.localwire import LocalChannel

    assert isinstance(model._channel, LocalChannel)
    x = _image(1)
    want = model.compute({"image": x})["probs"]
    errors: list[BaseException] = []

    def one() -> None:
        try:
            np.testing.assert_array_equal(model.compute({"image": x})["probs"], want)
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    for _ in range(300):
        t = threading.Thread(target=one)
        t.start()
        t.join()
    gc.collect()
    assert errors == []
    assert len(model._channel._conns) <= 2  # this thread's, and at most one not yet collected


def test_many_threads_at_once(model: Model) -> None:
    errors: list[BaseException] = []
    x = _image(3)
    want = model.compute({"image": x})["probs"]

    def work() -> None:
        try:
            for _ in range(30):
                np.testing.assert_array_equal(model.compute({"image": x})["probs"], want)
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_compute_async(model: Model) -> None:
    async def go() -> list[dict]:
        return await asyncio.gather(
            *(model.compute_async({"image": _image(1, s)}) for s in range(5))
        )

    results = asyncio.run(go())
    assert len(results) == 5 and all(r["probs"].shape == (1, 5) for r in results)


def test_health_and_stats(model: Model) -> None:
    h = model.health()
    assert h["provider"] == "CPUExecutionProvider"
    assert h["hardening"]["dumpable"]["status"] == "on"
    assert h["kernel"]["dumpable"] == 0
    assert h["kernel"]["rlimit_core"] == [0, 0]
    assert h["lease"]["state"] == "none"
    s = model.stats()
    assert s["calls"] >= 1 and s["latency_ms"]["p50"] > 0


def test_crash_mid_flight_then_restart(sealed: Sealed) -> None:
    with open_sealed(sealed, worker_args=["--threads", "1"]) as m:
        first_pid = m.pid
        assert first_pid is not None
        # a huge batch keeps the worker busy while we kill it
        big = np.zeros((400_000, 8), np.uint8)
        killer = threading.Timer(0.05, os.kill, (first_pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(vault.WorkerCrashedError):
            for _ in range(200):
                m.compute({"image": big})
        killer.join()
        out = m.compute({"image": _image(1)})  # a fresh worker
        assert out["probs"].shape == (1, 5)
        assert m.pid != first_pid


def test_timeout(sealed: Sealed) -> None:
    with open_sealed(sealed, timeout=5) as m:
        pid = m.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30  # a state; the bound only stops a hang
        while time.monotonic() < deadline:  # the stop is asynchronous: wait for state T
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                    break
            time.sleep(0.01)
        try:
            with pytest.raises(vault.WorkerTimeoutError):
                m.compute({"image": _image(1)}, timeout=0.3)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert m.compute({"image": _image(1)})["probs"].shape == (1, 5)


def test_close_stops_the_worker_and_removes_its_directory(sealed: Sealed) -> None:
    m = open_sealed(sealed)
    pid, d = m.pid, m._localw.dir  # type: ignore[union-attr]
    assert pid is not None and os.path.isdir(d)
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    m.close()
    assert not os.path.exists(d)
    deadline = time.monotonic() + 30  # a state; the bound only stops a hang
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("worker still running after close()")
    with pytest.raises(vault.ConfigError):
        m.compute({"image": _image(1)})


def test_wrong_key_fails_startup_with_integrity_error(sealed: Sealed) -> None:
    bad = Sealed(sealed.path, bytes(32), sealed.publisher_pub, sealed.manifest)
    with pytest.raises(vault.IntegrityError):
        open_sealed(bad)


def test_cuda_without_gpu_is_a_config_error(sealed: Sealed) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA present")
    with pytest.raises(vault.ConfigError):
        open_sealed(sealed, worker_args=["--device", "cuda"])


@pytest.mark.gpu
def test_cuda_worker_reports_its_provider(sealed: Sealed) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    with open_sealed(sealed, worker_args=["--device", "cuda"]) as m:
        assert m.health()["provider"] == "CUDAExecutionProvider"
        assert m.compute({"image": _image(2)})["probs"].shape == (2, 5)


def test_model_left_open_is_cleaned_up_at_interpreter_exit(sealed: Sealed) -> None:
    """A caller that forgets close(): at exit the worker stops and its private
    directory goes, so nothing keeps plaintext alive after the caller."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from tests.sealed import Sealed, open_sealed\n"
        "s = Sealed(**json.loads(sys.argv[1]))\n"
        "m = open_sealed(s)\n"
        "print(json.dumps({'pid': m.pid, 'dir': m._localw.dir}), flush=True)\n"
        "m.compute({'image': np.ones((1, 8), np.uint8)})\n"
        # no close(): leave it to the interpreter's exit
    )
    arg = json.dumps({"path": sealed.path, "key": None, "publisher_pub": sealed.publisher_pub,
                      "manifest": {}})  # fmt: skip
    arg = arg.replace('"key": null', f'"key": {json.dumps(list(sealed.key))}')
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    out = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True,
                         timeout=60, cwd=root)  # fmt: skip
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[0])
    assert not os.path.exists(info["dir"])
    deadline = time.monotonic() + 30  # a state; the bound only stops a hang
    while time.monotonic() < deadline:
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("worker outlived its caller")

"""A licence holder floods the key server with requests it refuses (issue 17,
item 5): the audit and the database stay bounded, every refusal is still
accounted for, and another caller still gets its key.

The attacker is ``nobody`` holding a runtime licence and no device: it
pipelines thousands of key requests over its own CURVE connection (no wait
for answers), each one refused. The key server limits requests per CURVE
identity before any policy runs (answers ``rate_limited`` with a
``retry_after``) and audits identical refusals a few at a time, counting the
rest into one record per interval. The control serves the same flood with
both switched off (``--request-limit off --coalesce 0``): one audit record,
and its pages in the WAL, per request.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyserver.limits import Coalescer
from tests.conftest import KeyServerProcess
from tests.integration.test_worker_hardening import (
    SYSTEM_PYTHON,
    _as_nobody,
    _nobody,
    _nobody_env,
    nobody_python,  # noqa: F401 - a fixture
)
from vault.core import crypto as _crypto
from vault.core.errors import RateLimitedError, UnknownLicenceError
from vault.core.licence import Licence

MODEL, KEY_ID, DIGEST = "m", "k1", "sha256:" + "cd" * 32
FLOOD = 3000
INDIVIDUALLY = Coalescer(60.0).individually  # refusals of a kind audited one by one

FLOOD_SCRIPT = r"""
import json, os, sys, time
import msgpack, zmq
lic = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.linger = 0
s.sndhwm = s.rcvhwm = 0
s.curve_serverkey = lic["keyserver"]["public_key"].encode()
s.curve_publickey = lic["client"]["public_key"].encode()
s.curve_secretkey = lic["client"]["secret_key"].encode()
s.connect(lic["keyserver"]["address"])
for i in range(n):  # pipelined: nothing waits for an answer
    s.send(msgpack.packb({"v": 1, "op": "release", "id": i, "nonce": os.urandom(16),
                          "ts": time.time(), "model_id": "m", "key_id": "k1",
                          "package_digest": "sha256:" + "cd" * 32,
                          "licence_id": lic["licence_id"], "suite": "x25519",
                          "ephemeral_key": os.urandom(32)}, use_bin_type=True))
codes, retry = {}, 0
for _ in range(n):
    if not s.poll(60000):
        break
    r = msgpack.unpackb(s.recv(), raw=False)
    code = "ok" if r.get("ok") else r["error"]["code"]
    codes[code] = codes.get(code, 0) + 1
    retry += isinstance(r.get("error", {}).get("retry_after"), float)
print(json.dumps({"codes": codes, "retry_after": retry}))
"""


def _rows(ks: KeyServerProcess) -> list[tuple[str, str | None, dict[str, Any]]]:
    conn = sqlite3.connect(ks.dir / "keyserver.db")
    try:
        rows = conn.execute("SELECT event, actor, detail FROM audit ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


def _disk(ks: KeyServerProcess) -> int:
    """Bytes of the database and its WAL."""
    return sum(os.path.getsize(p) for p in (ks.dir / "keyserver.db", ks.dir / "keyserver.db-wal")
               if p.exists())  # fmt: skip


def _start(base: Path, name: str, *args: str) -> KeyServerProcess:
    from keyserver import init_dir

    d = base / name
    init_dir(d, address="tcp://127.0.0.1:7700")
    ks = KeyServerProcess(d, lease_ttl=30.0)
    ks.extra_args = [*args]
    ks.start()
    ks.register(MODEL, KEY_ID, _crypto.generate_key(), DIGEST)
    return ks


def _attacker(ks: KeyServerProcess, base: Path) -> str:
    """A runtime licence and no device, in a file only nobody reads."""
    nb = _nobody()
    lic = ks.issue(MODEL, holder="mallory")
    path = base / f"mallory-{ks.dir.name}.licence"
    path.write_bytes(lic.dumps())
    os.chown(path, nb.pw_uid, nb.pw_gid)
    return str(path)


def _flood(licence: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _as_nobody([SYSTEM_PYTHON, "-B", "-c", FLOOD_SCRIPT, licence, str(FLOOD)]),
        env=_nobody_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
    )  # fmt: skip


def _result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


@pytest.fixture
def base(request: pytest.FixtureRequest) -> Iterator[Path]:
    request.getfixturevalue("nobody_python")  # root, setpriv, an interpreter nobody runs
    d = Path(tempfile.mkdtemp(prefix="vault-flood-"))  # pytest's tmp dirs are 0700 root
    os.chmod(d, 0o711)  # nobody reaches its licence file, nothing else
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_flood_of_refusals_leaves_the_audit_bounded_and_serves_others(base: Path) -> None:
    anchor = base / "audit.anchor"
    ks = _start(base, "ks", "--coalesce", "3600", "--anchor", str(anchor))
    try:
        attacker = _attacker(ks, base)
        honest = ks.issue(MODEL, holder="alice")
        before_rows, before_disk = len(_rows(ks)), _disk(ks)
        proc = _flood(attacker)
        # while the flood runs (its first refusals are in the audit), another
        # caller asks for its key as the enrolled device, and gets it
        deadline_rows = before_rows + 1
        while len(_rows(ks)) < deadline_rows and proc.poll() is None:
            pass
        with ks.client(honest, timeout=10) as c:
            rel = c.release(model_id=MODEL, key_id=KEY_ID, package_digest=DIGEST)
            assert len(rel.key) == 32
        res = _result(proc)
        assert sum(res["codes"].values()) == FLOOD, res  # every request answered
        assert set(res["codes"]) == {"permission_denied", "rate_limited"}, res
        assert res["retry_after"] == res["codes"]["rate_limited"]  # each says when
        rows = _rows(ks)[before_rows:]
        kinds = {(e, d.get("reason"), d.get("limit")) for e, _, d in rows if e == "denied"}
        # at most INDIVIDUALLY records per distinct refusal (2 kinds here) while
        # it runs, plus the honest release's own records
        assert len(kinds) == 2, kinds
        assert len([r for r in rows if r[0] == "denied"]) <= INDIVIDUALLY * len(kinds)
        grew = _disk(ks) - before_disk
        # bounded by the records written, not by the requests: each record
        # (and each batch that wrote one) touches at most a few 4 KiB pages
        bound = (INDIVIDUALLY * len(kinds) + 8) * 4 * 4096
        assert grew <= bound, (grew, bound)
        assert ks.stop() == 0  # the counted refusals get their records at the stop
        rows = _rows(ks)[before_rows:]
        denied = sum(1 for e, _, d in rows if e == "denied" and d["op"] == "release")
        counted = sum(d["count"] for e, _, d in rows if e == "denied_repeated")
        assert denied + counted == FLOOD  # every refusal accounted for, none twice
        assert len([r for r in rows if r[0] == "denied_repeated"]) == len(kinds)
        verify = subprocess.run([sys.executable, "-m", "keyserver", "audit", str(ks.dir),
                                 "--verify", "--quiet", "--anchor", str(anchor)],
                                capture_output=True, text=True)  # fmt: skip
        assert verify.returncode == 0 and "audit chain OK" in verify.stdout, verify.stderr
        assert "anchor OK" in verify.stdout
    finally:
        ks.kill()


def test_control_without_limits_or_coalescing_a_flood_writes_a_record_per_request(
    base: Path,
) -> None:
    ks = _start(base, "control", "--coalesce", "0", "--request-limit", "off")
    try:
        attacker = _attacker(ks, base)
        before_rows, before_disk = len(_rows(ks)), _disk(ks)
        res = _result(_flood(attacker))
        assert res["codes"] == {"permission_denied": FLOOD}, res
        rows = _rows(ks)[before_rows:]
        assert len([r for r in rows if r[0] == "denied"]) == FLOOD
        bound = (INDIVIDUALLY * 2 + 8) * 4 * 4096
        assert _disk(ks) - before_disk > 2 * bound  # what the protected server stays under
    finally:
        ks.kill()


def test_requests_for_one_licence_are_limited_without_spending_anothers(base: Path) -> None:
    # what devices ask on a licence's behalf draws on that licence's bucket
    # only once its holder's proof verifies: nobody spends another's
    ks = _start(base, "per-licence", "--licence-request-limit", "1/s:2")
    try:
        bob, carol = ks.issue(MODEL, holder="bob"), ks.issue(MODEL, holder="carol")
        args = {"model_id": MODEL, "key_id": KEY_ID, "package_digest": DIGEST}
        # requests naming bob's licence without his proof cost bob nothing
        forged = Licence.from_json({**carol.to_json(), "licence_id": bob.licence_id})
        with ks.client(forged, timeout=10) as c:
            for _ in range(5):
                with pytest.raises(UnknownLicenceError):
                    c.release(**args)
        with ks.client(bob, timeout=10) as c:
            c.release(**args)  # his whole burst of 2 is still his
            c.release(**args)
            with pytest.raises(RateLimitedError) as limited:
                c.release(**args)
        assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 1.0
        assert "retry after" in str(limited.value)
        with ks.client(carol, timeout=10) as c:  # carol's bucket is her own
            assert len(c.release(**args).key) == 32
    finally:
        ks.kill()

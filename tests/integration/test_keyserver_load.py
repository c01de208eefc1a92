"""Many simultaneous callers, each on its own CURVE connection."""

from __future__ import annotations

import threading
import time

from vault.core import crypto as _crypto


def test_200_simultaneous_clients_all_get_the_right_key(keyserver):
    # correctness under a stampede, not the request limits (tests/unit/keyserver/
    # test_limits.py, test_keyserver_flood.py): 200 callers on one device for 3 s
    # ask far past the default 1000/s per device
    keyserver.kill()
    keyserver.extra_args = ["--request-limit", "off", "--device-request-limit", "off",
                            "--licence-request-limit", "off"]  # fmt: skip
    keyserver.start()
    keys = {f"m{i}": _crypto.generate_key() for i in range(4)}
    for model_id, key in keys.items():
        keyserver.register(model_id, "k1", key, f"digest-{model_id}")
    with keyserver.admin() as admin:
        licences = [admin.issue(f"m{i % 4}", holder=f"c{i}") for i in range(20)]
    n_clients, deadline = 200, time.monotonic() + 3.0
    barrier = threading.Barrier(n_clients)
    results: list[tuple[int, int]] = []  # (good, bad) per client
    errors: list[BaseException] = []

    def client(i: int) -> None:
        lic = licences[i % len(licences)]
        good = bad = 0
        try:
            with keyserver.client(lic, timeout=10) as ks:
                ks.ping()  # connect and handshake before the stampede
                barrier.wait(30)
                while True:
                    rel = ks.release(
                        model_id=lic.model_id or "",
                        key_id="k1",
                        package_digest=f"digest-{lic.model_id}",
                    )
                    if rel.key == keys[lic.model_id or ""]:
                        good += 1
                    else:
                        bad += 1
                    rel.wipe()
                    if time.monotonic() > deadline:
                        break
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        results.append((good, bad))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == n_clients
    assert all(good >= 1 and bad == 0 for good, bad in results)
    assert keyserver.proc.poll() is None

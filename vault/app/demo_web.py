"""``vault demo --web``: a split image classifier whose head runs in your browser.

Everything on this machine, in a temp dir: a key server; the demo classifier
(``vault demo``'s pre → CNN → post) split twice — after the first conv block
(a wide cut) and after the global pool (a narrow one) — with the tails sealed
and their keys registered; an enrolled device and ``vault worker serve`` on
it, serving the tails over the Open Inference Protocol (REST on loopback,
CORS for the page's origin only), admitting callers by bearer tokens minted
from a call licence; and a page server (:class:`.webpage.PageServer`) that
serves the page, the web client, onnxruntime-web's files from ``web/``'s npm
package, the heads and ``split.json``, and, as the vendor's backend would, a
fresh token per visitor at ``/token``. The page never gets a tail, a weight
of one, or a licence.

It prints the page's URL and serves until interrupted (Ctrl-C), or for
``seconds``; then stops everything and removes the temp dir.

Example::

    $ vault demo --web            # open the printed URL in a browser
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from ..core.errors import VaultError
from ..core.process import stop_process

__all__ = ["rest_url", "run_web_demo", "serve_http"]

TOKEN_SECONDS = 600


def rest_url(stdout: str) -> str | None:
    """The REST door's base URL from what ``vault worker serve --http`` printed:
    its ``open inference protocol (REST): URL/v2`` line, or a JSON ready line
    that carries ``http_port`` (plain HTTP on loopback), once either is there."""
    import json

    for line in stdout.splitlines():
        if line.startswith("open inference protocol (REST): "):
            return line.split(": ", 1)[1].strip().removesuffix("/v2")
        if line.startswith("{"):
            try:
                ready = json.loads(line)
            except ValueError:
                continue
            if isinstance(ready, dict) and ready.get("http_port"):
                return f"http://127.0.0.1:{int(ready['http_port'])}"
    return None


def serve_http(
    tmp: str, tails: list[str], licences: list[str], device: str, origin: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``vault worker serve`` for the tails; returns it and its REST base URL (read
    from its start-up lines, which go to a file: a pipe nobody reads would fill)."""
    import time

    cmd = [sys.executable, "-m", "vault", "worker", "serve", *tails]
    for lic in licences:
        cmd += ["--licence", lic]
    cmd += ["--device", device, "--call-licences", "--bind", "tcp://127.0.0.1:0",
            "--instances", "1", "--http", "0", "--http-cors-origin", origin]  # fmt: skip
    out_path, log_path = os.path.join(tmp, "service.out"), os.path.join(tmp, "service.log")
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=out, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with open(out_path, encoding="utf-8", errors="replace") as fh:
            url = rest_url(fh.read())
        if url is not None:
            return proc, url
        time.sleep(0.1)
    stop_process(proc, 5)
    with open(log_path, "rb") as fh:
        tail = fh.read()[-2000:].decode(errors="replace")
    raise VaultError(f"the demo's worker service did not start:\n{tail}")


def run_web_demo(*, port: int = 0, seconds: float | None = None, lease_ttl: float = 5.0) -> int:
    from ..core.crypto import PublisherKey
    from ..core.device import init_device, record_keyserver
    from ..core.graphs import shape_text
    from ..core.keyclient import KeyServerClient
    from ..core.licence import Licence
    from ..core.token import mint_token
    from ..hybrid.publish import split
    from .demo import _start_keyserver, build_classifier
    from .webpage import PageServer, web_root

    web = web_root()  # before anything starts: says how to build it when missing
    ks_proc = service = None
    page: PageServer | None = None
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="vault-web-demo-") as tmp:
        try:
            from keyserver.layout import init_dir

            root = os.path.join(tmp, "ks")
            init_dir(root, address="tcp://127.0.0.1:0")
            ks_proc, address = _start_keyserver(root, os.path.join(tmp, "ks.log"), lease_ttl)
            admin_path = os.path.join(root, "admin.licence")
            admin = Licence.load(admin_path)
            admin.keyserver_address = address
            admin.save(admin_path)
            print(f"key server on {address}")
            pre, net, post = build_classifier()
            out = os.path.join(tmp, "clf.split")
            with KeyServerClient(admin) as ks:

                def register(res: Any) -> None:
                    ks.register_key(model_id=res.model_id, key_id=res.key_id, key=res.key,
                                    package_digest=res.digest)  # fmt: skip

                result = split(net, pre=pre, post=post, model_id="clf", at=[["p1"], ["f"]],
                               split_points=["p1", "f"], register=register, output_dir=out,
                               signing_key=PublisherKey.load(os.path.join(root, "publisher.key")))  # fmt: skip
                cuts = result.description["cuts"]
                dev = init_device(os.path.join(tmp, "device"))
                ks.enroll_device(device_id=dev.device_id, public_key=dev.public_key,
                                 service=True)  # fmt: skip
                record_keyserver(os.path.join(tmp, "device"), address=admin.keyserver_address,
                                 public_key=admin.keyserver_public_key)  # fmt: skip
                svc, shop = [], {}
                for c in cuts:
                    path = os.path.join(tmp, f"service-{c['name']}.licence")
                    ks.issue(c["tail_model_id"], holder="vendor-service").save(path)
                    svc.append(path)
                    shop[c["tail_model_id"]] = ks.issue(c["tail_model_id"], holder="web-shop",
                                                        kind="call")  # fmt: skip
            for c in cuts:
                cross = ", ".join(
                    f"{x['name']} {x['encoding']} {shape_text(x['shape'])}" for x in c["crossing"]
                )
                print(f"split cut {c['name']}: head {c['head']} in the page, tail "
                      f"{c['tail_model_id']} on the server; crossing: {cross}")  # fmt: skip

            def tokens() -> dict[str, str]:  # the vendor's backend: one token per visitor
                return {m: mint_token(lic, models=[m], expires=TOKEN_SECONDS)
                        for m, lic in shop.items()}  # fmt: skip

            page = PageServer(web_root=web, splits={"clf.split": out},
                              config={"split": "/models/clf.split/",
                                      "token_seconds": TOKEN_SECONDS},
                              tokens=tokens, port=port)  # fmt: skip
            origin = page.url.rstrip("/")
            tails = [os.path.join(out, c["tail"]) for c in cuts]
            service, rest = serve_http(tmp, tails, svc, os.path.join(tmp, "device"), origin)
            page.config["server"] = rest
            page.start()
            print(f"worker service (Open Inference Protocol REST) on {rest}, CORS for {origin}")
            print(f"open {page.url} in a browser (Ctrl-C stops the demo)", flush=True)
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                stop.wait(seconds)
            except KeyboardInterrupt:
                pass
            finally:
                signal.signal(signal.SIGTERM, previous)
            print("stopping: the page server, the worker service, the key server")
            return 0
        finally:
            if page is not None:
                page.stop()
            if service is not None:
                stop_process(service, 10)
            if ks_proc is not None:
                stop_process(ks_proc, 5)

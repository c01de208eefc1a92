"""Serve a split model's page: what a vendor's web server gives a browser.

Only public files leave this server: the page, the ``@vault-sandbox/web``
client (``web/dist``), onnxruntime-web's own ``.mjs``/``.wasm`` files (from
the npm package in ``web/node_modules``: nothing is fetched from anywhere
else), and, per split, ``split.json`` and the ``head-*.onnx`` files. A
split's tail packages (``tail-*.vault``) and anything else in its folder are
never served (404), whatever the path asks for; neither is a licence.

``tokens`` is the vendor's backend: ``GET /token`` answers a fresh
short-lived bearer token per page (what a vendor's web backend does for each
signed-in user), so the page holds a token, never a licence.

Example::

    with PageServer(web_root="web", splits={"clf.split": "out/clf.split"},
                    config={"server": "http://127.0.0.1:8000"}, tokens=mint) as page:
        print(page.url)        # http://127.0.0.1:PORT/
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..core.errors import ConfigError

__all__ = ["PageServer", "web_root"]

_PUBLIC_SPLIT_FILE = re.compile(r"^(split\.json|head-c[0-9]+\.onnx)$")
_ORT_FILE = re.compile(r"^ort[\w.-]*\.(mjs|wasm)$")
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
          ".onnx": "application/octet-stream", ".json": "application/json",
          ".html": "text/html; charset=utf-8", ".css": "text/css", ".map": "application/json"}  # fmt: skip


def web_root() -> Path:
    """The repository's ``web/`` folder (``$VAULT_WEB_DIR`` overrides), built:
    ``npm ci && npm run build`` there makes ``dist/`` and ``node_modules/``."""
    root = Path(os.environ.get("VAULT_WEB_DIR") or Path(__file__).resolve().parents[2] / "web")
    for need in ("dist/index.js", "node_modules/onnxruntime-web/dist/ort.min.mjs"):
        if not (root / need).is_file():
            raise ConfigError(
                f"{root / need} is missing: build the web client first "
                f"(cd {root} && npm ci && npm run build)"
            )
    return root


class PageServer:
    """A static server on 127.0.0.1 (a free port unless ``port``): see the module docstring."""

    def __init__(
        self,
        *,
        web_root: str | os.PathLike[str],
        splits: Mapping[str, str | os.PathLike[str]],
        config: Mapping[str, Any],
        tokens: Callable[[], Mapping[str, str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        root = Path(web_root).resolve()
        self.files: dict[str, Path] = {}
        for p in sorted((root / "dist").glob("*.js")):
            self.files[f"/_vault/web/{p.name}"] = p
        for p in sorted((root / "node_modules" / "onnxruntime-web" / "dist").iterdir()):
            if _ORT_FILE.match(p.name):
                self.files[f"/_vault/ort/{p.name}"] = p
        for p in sorted((root / "demo").iterdir()):
            if p.suffix in (".html", ".js", ".css"):
                self.files[f"/{p.name}"] = p
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]
        for name, folder in splits.items():
            for p in sorted(Path(folder).iterdir()):
                if _PUBLIC_SPLIT_FILE.match(p.name):  # the tail packages never
                    self.files[f"/models/{name}/{p.name}"] = p
        self.config = dict(config)
        self.tokens = tokens
        self.served: list[str] = []  # every path asked for, answered or not
        self.log: list[tuple[str, int, bytes]] = []  # (path, status, body) of each answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = unquote(urlsplit(self.path).path)
                server.served.append(path)
                if path == "/config.json":
                    self._send(200, "application/json", json.dumps(server.config).encode())
                elif path == "/token" and server.tokens is not None:
                    self._send(200, "application/json", json.dumps(server.tokens()).encode())
                elif path in server.files:
                    f = server.files[path]
                    kind = _TYPES.get(f.suffix) or mimetypes.guess_type(f.name)[0]
                    self._send(200, kind or "application/octet-stream", f.read_bytes())
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, status: int, kind: str, body: bytes) -> None:
                server.log.append((unquote(urlsplit(self.path).path), status, body))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="vault-page",
                                        daemon=True)  # fmt: skip

    def start(self) -> PageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a loop that never started otherwise
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

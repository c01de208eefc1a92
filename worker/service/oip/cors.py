"""Cross-origin access to the REST door, for web pages (``--http-cors-origin``).

A page on the vendor's site (``https://shop.example``) calls the service on
another origin (``https://api.example:8443``) with ``fetch``: the browser
sends a preflight ``OPTIONS`` (the bearer token rides in ``Authorization``,
the binary extension in ``Inference-Header-Content-Length``), and reads an
answer only if the service names the page's origin. Nothing is allowed by
default: each deployment lists its own origins. Credentials (cookies) are
never allowed: a page authenticates with its bearer token, which a foreign
page does not have. The answer's ``Inference-Header-Content-Length`` and
``Retry-After`` are exposed, or a page could not read a binary answer or
know when to retry.

Starlette's ``CORSMiddleware`` does the protocol (preflight, ``Vary:
Origin``, exact origin matching).

Example::

    app = with_cors(RestApp(plane, max_body=1 << 30), ["https://shop.example"])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vault.core.errors import ConfigError

__all__ = ["check_origin", "with_cors"]

_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
)


def check_origin(origin: str) -> str:
    """An origin as a browser sends it (``scheme://host[:port]``, no path), or ``*``."""
    if origin == "*" or _ORIGIN.match(origin):
        return origin
    raise ConfigError(
        f"CORS origin {origin!r}: give scheme://host[:port] as the page's address bar shows "
        "it (no path, no trailing slash), or * for any page"
    )


def with_cors(app: Any, origins: Sequence[str]) -> Any:
    """``app`` answering the browsers of pages at ``origins`` (see the module docstring)."""
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(
        app,
        allow_origins=[check_origin(o) for o in origins],
        allow_methods=["GET", "POST"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "Content-Encoding",
            "Inference-Header-Content-Length",
        ],
        expose_headers=["Inference-Header-Content-Length", "Retry-After"],
        allow_credentials=False,
        max_age=600,
    )

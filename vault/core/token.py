"""Scoped bearer tokens minted from a call licence.

A call licence's holder (a vendor's web backend, say) mints short-lived
tokens for its own end users, who then call the vendor's service over the
Open Inference Protocol (REST or gRPC) with ``Authorization: Bearer TOKEN``.
An end user never holds the licence's secret keys.

A token is ``vault1.<payload>.<signature>`` (both unpadded base64url): the
payload is canonical JSON naming the licence (its id and its CURVE public
key, by which the service already knows a call licence), the models it may
call, when it was issued and when it expires (at most :data:`MAX_LIFETIME`
apart), an optional call budget and a random id; the signature is Ed25519
by the licence's proof-of-possession key over a domain tag and the payload.
The service checks it offline against the proof key's public half, which
it learns from the key server with its decision for that licence, and
meters each call under the licence exactly as a ZeroMQ caller's.

Every way a token fails to verify (bad encoding, wrong version, bad
signature, a licence that does not match) is one opaque
:class:`~vault.core.errors.TokenError`; an expired one is
:class:`~vault.core.errors.TokenExpiredError`.

Example::

    lic = Licence.load("shop.licence")                # a call licence
    text = mint_token(lic, models=["clf"], expires=600, max_calls=100)
    tok = parse_token(text)                           # no key needed
    tok.verify(proof_public_key_b64)                  # TokenError if forged
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import crypto as _crypto
from .errors import ConfigError, IntegrityError, TokenError, TokenExpiredError
from .licence import Licence
from .modelscope import describe

__all__ = ["MAX_LIFETIME", "PREFIX", "Token", "mint_token", "parse_token"]

PREFIX = "vault1"
MAX_LIFETIME = 24 * 3600.0  # a token is good for a day at most: a stolen one dies
MAX_TOKEN_CHARS = 4096
MAX_MODELS = 64
CLOCK_SKEW = 60.0  # a token issued up to this far in the future is still taken
_DOMAIN = b"vault-token/1\x00"


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not text or len(text) % 4 == 1:
        raise TokenError()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError() from None


@dataclass(frozen=True)
class Token:
    """A parsed (not yet verified) token."""

    licence_id: str
    licence_key: str  # the licence's CURVE public key (Z85), as the key server knows it
    models: tuple[str, ...]
    issued_at: float
    expires_at: float
    max_calls: int | None
    token_id: str
    payload: bytes
    signature: bytes

    def verify(self, proof_public_key: str, *, licence_id: str | None = None) -> None:
        """Raise :class:`TokenError` unless the licence's proof key signed
        this token (and, if given, ``licence_id`` is the licence it names)."""
        if licence_id is not None and licence_id != self.licence_id:
            raise TokenError()
        try:
            raw = base64.b64decode(proof_public_key, validate=True)
            _crypto.verify_signature(raw, self.signature, _DOMAIN + self.payload)
        except (IntegrityError, binascii.Error, ValueError):
            raise TokenError() from None

    def check_time(self, now: float | None = None) -> None:
        """Raise :class:`TokenExpiredError` past its expiry (or before its issue)."""
        t = time.time() if now is None else now
        if t >= self.expires_at:
            raise TokenExpiredError(f"the bearer token {self.token_id} has expired")
        if t + CLOCK_SKEW < self.issued_at:
            raise TokenError()

    def allows(self, model_id: str) -> bool:
        return model_id in self.models

    def __repr__(self) -> str:  # the text of a token is a credential: never print it
        return (
            f"Token(id={self.token_id!r}, licence={self.licence_id!r}, models={self.models!r}, "
            f"expires_at={self.expires_at!r}, max_calls={self.max_calls!r})"
        )


def mint_token(
    licence: Licence | str | os.PathLike[str],
    *,
    models: Sequence[str] | str,
    expires: float = 600.0,
    max_calls: int | None = None,
    now: float | None = None,
) -> str:
    """A bearer token for ``models``, valid ``expires`` seconds (at most a
    day), optionally good for ``max_calls`` calls, signed with the call
    licence's proof key. The text is a credential: hand it to one end user."""
    lic = Licence.load(licence)
    if lic.kind != "call":
        an = "an" if lic.kind[:1] in "aeiou" else "a"
        raise ConfigError(
            f"licence {lic.licence_id} is {an} {lic.kind} licence: tokens are minted from a call "
            "licence (`vault licence issue MODEL --to NAME --kind call --licence admin.licence "
            "-o NAME.licence`)"
        )
    if not lic.proof_key:
        raise ConfigError(
            f"licence {lic.licence_id} has no proof key (issued by an older key server?)"
        )
    names = [models] if isinstance(models, str) else list(models)
    if not names or len(names) > MAX_MODELS or not all(isinstance(m, str) and m for m in names):
        raise ConfigError(f"a token names 1 to {MAX_MODELS} model ids")
    # the licence's model scope: one id, several (``a,b``), ``prefix*`` or ``*``
    outside = sorted({m for m in names if lic.model_id is not None and not lic.covers(m)})
    if outside:
        raise ConfigError(
            f"licence {lic.licence_id} is for {describe(lic.model_id)}, "
            f"not {', '.join(repr(m) for m in outside)}"
        )
    if not (0 < expires <= MAX_LIFETIME):
        raise ConfigError(
            f"a token lives at most 1d ({MAX_LIFETIME:.0f} s), and more than 0 s: not {expires:g} s"
        )
    if max_calls is not None and (isinstance(max_calls, bool) or max_calls < 1):
        raise ConfigError("max_calls must be a positive number of calls")
    t = time.time() if now is None else now
    body: dict[str, Any] = {
        "v": 1,
        "lic": lic.licence_id,
        "key": lic.client_public_key,
        "models": sorted(set(names)),
        "iat": t,
        "exp": t + expires,
        "jti": _b64e(os.urandom(16)),
    }
    if max_calls is not None:
        body["max_calls"] = int(max_calls)
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    key = _crypto.PublisherKey.from_private_raw(base64.b64decode(lic.proof_key))
    return f"{PREFIX}.{_b64e(payload)}.{_b64e(key.sign(_DOMAIN, payload))}"


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise TokenError()
    return float(v)


def parse_token(text: Any) -> Token:
    """Parse a token's text (no signature check yet); :class:`TokenError` if malformed."""
    if not isinstance(text, str) or len(text) > MAX_TOKEN_CHARS:
        raise TokenError()
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError()
    payload, sig = _b64d(parts[1]), _b64d(parts[2])
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[..." nests past the stack
        raise TokenError() from None
    if not isinstance(body, dict) or body.get("v") != 1 or len(sig) != 64:
        raise TokenError()
    lic, key, models, jti = body.get("lic"), body.get("key"), body.get("models"), body.get("jti")
    if (
        not isinstance(lic, str)
        or not lic
        or not isinstance(key, str)
        or len(key) != 40
        or not isinstance(jti, str)
        or not jti
        or not isinstance(models, list)
        or not 0 < len(models) <= MAX_MODELS
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise TokenError()
    iat, exp = _num(body.get("iat")), _num(body.get("exp"))
    if not 0 < exp - iat <= MAX_LIFETIME + 1:
        raise TokenError()
    budget = body.get("max_calls")
    if budget is not None and (
        not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
    ):
        raise TokenError()
    return Token(lic, key, tuple(models), iat, exp, budget, jti, payload, sig)

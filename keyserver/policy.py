"""Licence policy: small composable checks, each one method.

A policy is anything with ``check(ctx) -> None`` that raises a typed
:class:`vault.core.errors.LicenceError` to deny. The server runs
:func:`default_release_policy` on every key release and
:func:`default_renew_policy` on every lease renewal; a vendor adds a rule
(business hours, an IP allow-list, ...) by composing, without touching the
server loop.

Time is ``ctx.now`` (a parameter), so every rule is testable without sleeping.

Example::

    class BusinessHours:
        def check(self, ctx: Context) -> None:
            if not 9 <= time.gmtime(ctx.now).tm_hour < 17:
                raise LicenceError("keys are released 09:00-17:00 UTC only")

    policy = AllOf(default_release_policy(), BusinessHours())

The quota (``max_calls``) is checked here; the rate limit sizes lease budgets
in :mod:`keyserver.metering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vault.core.errors import (
    DigestMismatchError,
    LicenceExpiredError,
    LicenceRevokedError,
    QuotaExhaustedError,
    WrongModelError,
)
from vault.core.modelscope import covers

__all__ = [
    "AllOf",
    "BoundToModel",
    "Context",
    "DeviceRecord",
    "DigestMatches",
    "KeyRecord",
    "LicenceRecord",
    "NotExpired",
    "NotRevoked",
    "Policy",
    "QuotaLeft",
    "default_release_policy",
    "default_renew_policy",
]


@dataclass(frozen=True)
class LicenceRecord:
    """A licence as the server stores it (no secret: the server never keeps
    the holder's CURVE secret key)."""

    licence_id: str
    holder: str
    role: str
    model_id: str | None
    client_public_key: str
    issued_at: float
    expires_at: float | None
    max_calls: int | None
    rate_limit: float | None
    grace: float
    revoked_at: float | None
    used_calls: int  # calls reported by workers, and reserves forfeited by dead ones
    reserved_calls: int = 0  # calls reserved by open leases (debited, not yet reported)
    rate_tokens: float | None = None  # the call bucket (see keyserver.metering)
    rate_at: float | None = None
    kind: str = "runtime"  # runtime, call or admin
    same_user: bool = False  # tier 0: the holder's own user may run the worker
    devices: tuple[str, ...] = ()  # the only devices it works on (empty: any enrolled)
    proof_public_key: str | None = None  # verifies the holder's proofs of possession
    mac: bytes | None = None  # the row's tag (keyserver.rowauth); not part of the decision

    @property
    def debited_calls(self) -> int:
        """What the quota has given out: used plus reserved."""
        return self.used_calls + self.reserved_calls

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class DeviceRecord:
    """An enrolled device: its CURVE public key is its transport identity."""

    device_id: str
    public_key: str
    name: str
    enrolled_at: float
    enrolled_by: str
    revoked_at: float | None
    mac: bytes | None = None  # the row's tag (keyserver.rowauth)


@dataclass(frozen=True)
class KeyRecord:
    model_id: str
    key_id: str
    package_digest: str


@dataclass(frozen=True)
class Context:
    """What a policy may look at. ``key`` is None for renewals."""

    op: str
    licence: LicenceRecord
    now: float
    model_id: str
    package_digest: str | None = None
    key: KeyRecord | None = None


@runtime_checkable
class Policy(Protocol):
    def check(self, ctx: Context) -> None: ...


@dataclass(frozen=True)
class AllOf:
    """Every policy must pass; the first denial wins (order them cheap first,
    stateful ones such as rate limits last, so a denied request costs no token)."""

    policies: tuple[Policy, ...]

    def __init__(self, *policies: Policy) -> None:
        object.__setattr__(self, "policies", tuple(policies))

    def check(self, ctx: Context) -> None:
        for p in self.policies:
            p.check(ctx)


class NotRevoked:
    def check(self, ctx: Context) -> None:
        if ctx.licence.revoked_at is not None:
            raise LicenceRevokedError(f"licence {ctx.licence.licence_id} was revoked")


class NotExpired:
    def check(self, ctx: Context) -> None:
        exp = ctx.licence.expires_at
        if exp is not None and ctx.now >= exp:
            raise LicenceExpiredError(f"licence {ctx.licence.licence_id} has expired")


class BoundToModel:
    """The licence's model scope covers the model (one id, several, a
    ``prefix*`` pattern or ``*``: :mod:`vault.core.modelscope`)."""

    def check(self, ctx: Context) -> None:
        if not covers(ctx.licence.model_id, ctx.model_id):
            raise WrongModelError(
                f"licence {ctx.licence.licence_id} is not for model {ctx.model_id!r}"
            )


class DigestMatches:
    """The package the caller holds is the one whose key was registered."""

    def check(self, ctx: Context) -> None:
        if ctx.key is not None and ctx.package_digest != ctx.key.package_digest:
            raise DigestMismatchError()


class QuotaLeft:
    """Calls reserved by open leases count as spent: the quota cannot be
    exceeded by any number of concurrent or successive leases."""

    def check(self, ctx: Context) -> None:
        cap = ctx.licence.max_calls
        if cap is not None and ctx.licence.debited_calls >= cap:
            raise QuotaExhaustedError(
                f"licence {ctx.licence.licence_id} has used or reserved its {cap} calls"
            )


def default_release_policy() -> AllOf:
    # The rate limit is not a policy here: it sizes each lease's call budget
    # from a bucket kept with the licence (keyserver.metering), for grants and
    # renewals alike.
    return AllOf(NotRevoked(), NotExpired(), BoundToModel(), DigestMatches(), QuotaLeft())


def default_renew_policy() -> AllOf:
    return AllOf(NotRevoked(), NotExpired(), QuotaLeft())

from __future__ import annotations

import dataclasses

import pytest

from keyserver.policy import (
    AllOf,
    BoundToModel,
    Context,
    DigestMatches,
    KeyRecord,
    LicenceRecord,
    NotExpired,
    NotRevoked,
    Policy,
    QuotaLeft,
    default_release_policy,
)
from vault.core.errors import (
    DigestMismatchError,
    LicenceError,
    LicenceExpiredError,
    LicenceRevokedError,
    QuotaExhaustedError,
    WrongModelError,
)

LIC = LicenceRecord(
    licence_id="lic-1", holder="alice", role="caller", model_id="m", client_public_key="k",
    issued_at=0.0, expires_at=None, max_calls=None, rate_limit=None, grace=0.0,
    revoked_at=None, used_calls=0,
)  # fmt: skip
KEY = KeyRecord("m", "k1", "d1")


def ctx(now: float = 100.0, model: str = "m", digest: str = "d1", **lic: object) -> Context:
    return Context("release", dataclasses.replace(LIC, **lic), now, model, digest, KEY)


def test_a_clean_licence_passes_the_default_policy():
    default_release_policy().check(ctx())


@pytest.mark.parametrize(
    ("policy", "context", "error"),
    [
        (NotRevoked(), ctx(revoked_at=5.0), LicenceRevokedError),
        (NotExpired(), ctx(now=100.0, expires_at=100.0), LicenceExpiredError),
        (BoundToModel(), ctx(model="other"), WrongModelError),
        (DigestMatches(), ctx(digest="d2"), DigestMismatchError),
        (QuotaLeft(), ctx(max_calls=5, used_calls=5), QuotaExhaustedError),
    ],
)
def test_each_rule_denies_with_its_typed_error(policy, context, error):
    assert isinstance(policy, Policy)
    with pytest.raises(error):
        policy.check(context)
    with pytest.raises(error):
        default_release_policy().check(context)


def test_boundaries_pass():
    NotExpired().check(ctx(now=99.9, expires_at=100.0))
    QuotaLeft().check(ctx(max_calls=5, used_calls=4))


def test_reserved_calls_count_against_the_quota():
    with pytest.raises(QuotaExhaustedError):
        QuotaLeft().check(ctx(max_calls=10, used_calls=3, reserved_calls=7))
    QuotaLeft().check(ctx(max_calls=10, used_calls=3, reserved_calls=6))


def test_all_of_stops_at_the_first_denial_and_vendors_can_add_rules():
    calls: list[str] = []

    class OfficeHours:
        def check(self, c: Context) -> None:
            calls.append("hours")
            if not 9 <= (c.now // 3600) % 24 < 17:
                raise LicenceError("keys are released 09:00-17:00 UTC only")

    policy = AllOf(default_release_policy(), OfficeHours())
    policy.check(ctx(now=10 * 3600))
    with pytest.raises(LicenceError, match="09:00"):
        policy.check(ctx(now=20 * 3600))
    with pytest.raises(LicenceRevokedError):
        policy.check(ctx(now=10 * 3600, revoked_at=1.0))
    assert calls == ["hours", "hours"]  # not reached for the revoked licence

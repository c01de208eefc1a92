"""Key release and key wrapping primitives: what binds a key to its context."""

from __future__ import annotations

import pytest

from vault.core import crypto as _crypto
from vault.core.errors import ConfigError, IntegrityError


@pytest.mark.parametrize("suite", _crypto.HPKE_SUITES)
def test_hpke_release_opens_only_with_the_same_context(suite: str) -> None:
    key = _crypto.generate_key()
    info = _crypto.key_release_info("model-a", "sha256:aa", "lic-1")
    eph = _crypto.EphemeralKey(suite)
    sealed = _crypto.hpke_seal(suite, eph.public_bytes, key, info)
    assert bytes(key) not in sealed
    assert eph.open(sealed, info) == key
    for other in (
        _crypto.key_release_info("model-b", "sha256:aa", "lic-1"),
        _crypto.key_release_info("model-a", "sha256:bb", "lic-1"),
        _crypto.key_release_info("model-a", "sha256:aa", "lic-2"),
    ):
        eph2 = _crypto.EphemeralKey(suite)
        with pytest.raises(IntegrityError):
            eph2.open(_crypto.hpke_seal(suite, eph2.public_bytes, key, info), other)


def test_ephemeral_key_is_single_use() -> None:
    eph = _crypto.EphemeralKey()
    info = b"ctx"
    sealed = _crypto.hpke_seal("x25519", eph.public_bytes, b"k" * 32, info)
    eph.open(sealed, info)
    with pytest.raises(IntegrityError):
        eph.open(sealed, info)


def test_unknown_suite_and_bad_public_key_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown HPKE suite"):
        _crypto.EphemeralKey("rot13")
    with pytest.raises(ConfigError):
        _crypto.hpke_seal("x25519", b"short", b"k" * 32, b"")


def test_wrapped_key_is_bound_to_key_id_and_model_id() -> None:
    master = _crypto.generate_key()
    key = _crypto.generate_key()
    wrapped = _crypto.wrap_key(master, key, key_id="k1", model_id="m1")
    assert bytes(key) not in wrapped
    assert _crypto.unwrap_key(master, wrapped, key_id="k1", model_id="m1") == key
    with pytest.raises(IntegrityError):
        _crypto.unwrap_key(master, wrapped, key_id="k2", model_id="m1")
    with pytest.raises(IntegrityError):
        _crypto.unwrap_key(master, wrapped, key_id="k1", model_id="m2")
    with pytest.raises(IntegrityError):
        _crypto.unwrap_key(_crypto.generate_key(), wrapped, key_id="k1", model_id="m1")


def test_zeroize_overwrites() -> None:
    buf = bytearray(b"secret" * 1000)
    _crypto.zeroize(buf)
    assert buf == bytearray(len(buf))

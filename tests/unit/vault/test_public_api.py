"""`vault`'s public API is exactly its `__all__`: every name there resolves,
every public exception the wire can carry is importable, and no public
docstring sends a user to a private module."""

from __future__ import annotations

import inspect
import types

import vault
from vault.core import errors


def test_every_name_in_all_resolves() -> None:
    for name in vault.__all__:
        assert getattr(vault, name) is not None, name


def test_module_namespace_is_exactly_all() -> None:
    for name in vault.__all__:  # resolve the lazy ones first
        getattr(vault, name)
    public = {
        n
        for n, v in vars(vault).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert public == {n for n in vault.__all__ if not n.startswith("_")}


def test_every_wire_error_is_public() -> None:
    wire = {
        n
        for n, v in vars(errors).items()
        if isinstance(v, type) and issubclass(v, errors.VaultError)
    }
    assert wire <= set(vault.__all__), sorted(wire - set(vault.__all__))
    assert vault.AuditError is errors.AuditError


def test_public_docstrings_name_only_public_modules() -> None:
    for name in vault.__all__:
        obj = getattr(vault, name)
        doc = inspect.getdoc(obj) or ""
        assert "vault._" not in doc, f"{name}'s docstring names a private module"
    assert "vault._" not in (inspect.getdoc(vault.sealing) or "")


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        vault.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("vault.no_such_thing resolved")


def test_bearer_tokens_are_public() -> None:
    # a vendor's web backend mints tokens for its end users with the public API alone
    assert "mint_token" in vault.__all__
    assert vault.mint_token.__module__ == "vault.core.token"
    assert issubclass(vault.TokenExpiredError, vault.TokenError)
    assert issubclass(vault.TokenSpentError, vault.QuotaExhaustedError)


def test_the_readme_lists_exactly_all() -> None:
    """README's Layout says `vault/` (top) is exactly `vault.__all__` and
    names it: the names it lists, and the errors, are all of it (it once
    lacked `mint_token`, `inspect` and `SealResult`)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if "exactly `vault.__all__`" in line]
    listed = set(re.findall(r"`([A-Za-z_]\w*)`", row.split("exactly `vault.__all__`", 1)[1]))
    errors_ = {n for n in vault.__all__ if n.endswith("Error")}
    assert listed | errors_ == set(vault.__all__), sorted(set(vault.__all__) - listed - errors_)
    assert not listed & errors_

"""Bearer tokens minted from a call licence: what verifies and what does not."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

import vault
from vault.core.crypto import PublisherKey
from vault.core.errors import ConfigError, TokenError, TokenExpiredError
from vault.core.licence import Licence
from vault.core.token import MAX_LIFETIME, mint_token, parse_token


def _licence(lid: str = "lic-a", *, kind: str = "call", model: str | None = "m") -> Licence:
    proof = PublisherKey.generate()
    return Licence(licence_id=lid, holder="shop", keyserver_address="tcp://127.0.0.1:1",
                   keyserver_public_key="k" * 40, client_public_key=(lid[-1] * 40),
                   client_secret_key="s" * 40, model_id=model, kind=kind,
                   proof_key=base64.b64encode(proof.export_private_raw()).decode())  # fmt: skip


def test_a_token_verifies_against_its_licence_proof_key_only() -> None:
    a, b = _licence("lic-a"), _licence("lic-b")
    tok = parse_token(vault.mint_token(a, models=["m"], expires=60, max_calls=5))
    assert (tok.licence_id, tok.licence_key, tok.models, tok.max_calls) == (
        "lic-a",
        a.client_public_key,
        ("m",),
        5,
    )
    tok.verify(a.proof_public_key, licence_id="lic-a")
    with pytest.raises(TokenError):  # another licence's key: the control above passes
        tok.verify(b.proof_public_key)
    with pytest.raises(TokenError):  # right key, but the service's decision is another licence's
        tok.verify(a.proof_public_key, licence_id="lic-b")
    assert "vault1." not in repr(tok)  # the text is a credential: never in a repr


def test_a_changed_payload_is_refused() -> None:
    a = _licence()
    text = mint_token(a, models=["m"], expires=60, max_calls=1)
    prefix, payload, sig = text.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["max_calls"] = 1000  # more calls than minted
    forged = base64.urlsafe_b64encode(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    )
    tok = parse_token(f"{prefix}.{forged.decode().rstrip('=')}.{sig}")
    with pytest.raises(TokenError):
        tok.verify(a.proof_public_key)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "vault1",
        "vault1.a.b",
        "vault2.e30.AAAA",
        "x" * 5000,
        "vault1." + base64.urlsafe_b64encode(b"[]").decode() + "." + "A" * 86,
        # nested past the interpreter's stack: a RecursionError, a door's 500 and traceback
        "vault1." + base64.urlsafe_b64encode(b"[" * 2900).decode() + "." + "A" * 86,
    ],
)
def test_malformed_tokens_are_one_opaque_error(text: object) -> None:
    with pytest.raises(TokenError) as err:
        parse_token(text)
    assert type(err.value) is TokenError


def test_expiry_and_lifetime() -> None:
    a = _licence()
    now = time.time()
    tok = parse_token(mint_token(a, models=["m"], expires=10, now=now))
    assert tok.expires_at == now + 10
    tok.check_time(now + 9.999)
    with pytest.raises(TokenExpiredError):
        tok.check_time(now + 10)
    with pytest.raises(TokenError):  # issued in the future (beyond clock skew)
        tok.check_time(now - 3600)
    with pytest.raises(ConfigError):
        mint_token(a, models=["m"], expires=MAX_LIFETIME + 1)


def test_only_a_call_licence_for_its_own_model_mints() -> None:
    with pytest.raises(ConfigError):
        mint_token(_licence(kind="runtime"), models=["m"])
    with pytest.raises(ConfigError):
        mint_token(_licence(model="m"), models=["other"])
    with pytest.raises(ConfigError):
        mint_token(_licence(), models=["m"], max_calls=0)
    assert parse_token(mint_token(_licence(model=None), models=["x", "y"])).models == ("x", "y")


def test_a_licence_for_several_models_or_a_prefix_mints_for_each_it_covers() -> None:
    # `vault licence issue digits-mlp digits-rf --kind call` (the README's alice) and
    # `clf.tail*`: a token for any one of them, or several, was refused before
    # (the scope "digits-mlp,digits-rf" was compared as one model id)
    two = _licence(model="digits-mlp,digits-rf")
    assert parse_token(mint_token(two, models=["digits-rf"])).models == ("digits-rf",)
    assert parse_token(mint_token(two, models="digits-mlp")).models == ("digits-mlp",)
    both = parse_token(mint_token(two, models=["digits-rf", "digits-mlp"]))
    assert both.models == ("digits-mlp", "digits-rf")
    with pytest.raises(ConfigError, match="'digits-knn'"):  # the control: one it does not cover
        mint_token(two, models=["digits-mlp", "digits-knn"])
    with pytest.raises(ConfigError):  # the scope's text is no model id
        mint_token(two, models=["digits-mlp,digits-rf"])
    prefix = _licence(model="clf.tail*")
    assert parse_token(mint_token(prefix, models=["clf.tail.c1"])).models == ("clf.tail.c1",)
    with pytest.raises(ConfigError):
        mint_token(prefix, models=["clf.head"])
    assert parse_token(mint_token(_licence(model="*"), models=["any"])).models == ("any",)


def test_refusals_to_mint_say_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `vault licence token` prints for the two common mistakes: an admin
    licence ("is a admin licence", with no hint how to get a call licence)
    and a lifetime over a day ("within (0, 86400] seconds")."""
    from vault.app.cli import main

    with pytest.raises(ConfigError) as err:
        mint_token(_licence(kind="admin", model=None), models=["m"])
    assert "is an admin licence" in str(err.value)
    assert "--kind call" in str(err.value) and "vault licence issue" in str(err.value)
    path = tmp_path / "shop.licence"
    _licence().save(path)
    assert main(["licence", "token", str(path), "--model", "m", "--expires", "2d",
                 "-o", str(tmp_path / "t.token")]) == 2  # fmt: skip
    err_text = capsys.readouterr().err
    assert "at most 1d (86400 s)" in err_text and "172800" in err_text, err_text
    assert not (tmp_path / "t.token").exists()

from __future__ import annotations

import pytest

from vault.app.cli import build_parser
from vault.app.cli_keyserver import parse_duration, parse_rate
from vault.core.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45.0), ("45s", 45.0), ("90m", 5400.0), ("12h", 43200.0), ("30d", 2592000.0),
     ("1.5h", 5400.0)],
)  # fmt: skip
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "-1d", "3 days", "0"])
def test_parse_duration_refuses(bad):
    with pytest.raises(ConfigError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "per_s"), [("5/s", 5.0), ("300/m", 5.0), ("2.5", 2.5),
                                             ("7200/h", 2.0)])  # fmt: skip
def test_parse_rate(text, per_s):
    assert parse_rate(text) == per_s
    args = build_parser().parse_args(
        ["licence", "issue", "m", "--to", "b", "--rate", text, "--licence", "a.licence"]
    )
    assert args.rate_limit == per_s


@pytest.mark.parametrize("group", ["licence", "license"])
def test_both_spellings_parse(group):
    args = build_parser().parse_args(
        [group, "issue", "m", "--to", "bob", "--max-calls", "3", "--licence", "a.licence"]
    )
    assert args.model_id == ["m"] and args.to == "bob" and args.max_calls == 3


def test_keyserver_commands_parse():
    p = build_parser()
    a = p.parse_args(["keyserver", "serve", "d", "--bind", "tcp://127.0.0.1:0", "--lease-ttl", "2"])
    assert a.lease_ttl == 2.0 and a.bind == "tcp://127.0.0.1:0"
    assert p.parse_args(["keyserver", "audit", "d", "--verify"]).verify is True
    assert p.parse_args(["keyserver", "rotate-master", "d"]).ks_command == "rotate-master"
    assert p.parse_args(["keyserver", "init", "d"]).address == "tcp://127.0.0.1:7700"
    a = p.parse_args(
        ["keyserver", "serve", "d", "--database", "postgresql://h/db", "--anchor", "x"]
    )
    assert (a.database, a.anchor) == ("postgresql://h/db", "x")
    a = p.parse_args(["keyserver", "audit", "d", "--anchor", "x"])
    assert a.anchor == "x"

"""Which models a licence covers: its *model scope*.

A licence names the models it may be used with, in the ``model_id`` field of
the licence file and of the key server's row (one string, so the row's tag
and the audit record cover it as before):

- one model id: ``resnet`` (what ``vault licence issue resnet`` has always made);
- several, comma-separated: ``digits-mlp,digits-rf`` (``vault licence issue
  digits-mlp digits-rf``);
- a prefix pattern ending in ``*``: ``digits-*`` covers every model id that
  starts with ``digits-``, now or registered later;
- ``*`` alone: every model this key server holds a key for, now or later
  (``--all-models``). A key server has one publisher key, so this is "all of
  one publisher's models": what a vendor's own service serving a whole
  repository is given.

Model ids use letters, digits, ``.``, ``_``, ``:`` and ``-`` (``vault seal``
refuses anything else), so ``,`` and ``*`` cannot be part of one.

Example::

    scope = make_scope(["digits-rf", "digits-mlp"])   # "digits-mlp,digits-rf"
    covers(scope, "digits-rf")                        # True
    covers("digits-*", "digits-knn")                  # True
    covers("*", "anything")                           # True
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import ConfigError

__all__ = ["ALL", "MAX_SCOPE", "covers", "describe", "is_exact", "make_scope", "scope_items"]

ALL = "*"
MAX_SCOPE = 8192
_ITEM = re.compile(r"[A-Za-z0-9._:\-]{1,128}\*?|\*")


def make_scope(items: Iterable[str]) -> str:
    """The canonical scope string for model ids and ``PREFIX*`` patterns
    (sorted, no duplicates; ``*`` absorbs everything); :class:`ConfigError`
    for a malformed item."""
    found: set[str] = set()
    for raw in items:
        for item in str(raw).split(","):
            item = item.strip()
            if not _ITEM.fullmatch(item):
                raise ConfigError(
                    f"model {item!r}: give a model id (letters, digits, '.', '_', ':', '-'), "
                    "a prefix ending in '*', or '*' for every model"
                )
            found.add(item)
    if not found:
        raise ConfigError("name at least one model id (or --all-models)")
    if ALL in found:
        return ALL
    scope = ",".join(sorted(found))
    if len(scope) > MAX_SCOPE:
        raise ConfigError(f"a licence names at most {MAX_SCOPE} characters of model ids")
    return scope


def scope_items(scope: str | None) -> tuple[str, ...]:
    return () if not scope else tuple(scope.split(","))


def is_exact(scope: str | None) -> bool:
    """One model id, no pattern: a licence for exactly one model."""
    items = scope_items(scope)
    return len(items) == 1 and not items[0].endswith("*")


def covers(scope: str | None, model_id: str) -> bool:
    """Whether a licence with this scope may be used with ``model_id``."""
    for item in scope_items(scope):
        if item.endswith("*"):
            if model_id.startswith(item[:-1]):
                return True
        elif item == model_id:
            return True
    return False


def describe(scope: str | None) -> str:
    """For people: ``model m``, ``models a, b``, ``models a-*``, ``every model``."""
    items = scope_items(scope)
    if not items:
        return "no model"
    if items == (ALL,):
        return "every model of this key server"
    return ("model " if is_exact(scope) else "models ") + ", ".join(items)

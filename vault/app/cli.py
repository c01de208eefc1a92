"""The ``vault`` command line.

Each command group lives in its own module and registers its sub-parsers
here; this module only builds the parser, runs the chosen command, and turns
a :class:`vault.core.errors.VaultError` into one clear line on stderr and exit
code 2. Anything else is a bug and shows its traceback.

The CLI is the application layer: it may import ``keyserver`` and ``worker``
lazily (only the command that needs them); ``vault``'s library modules never do.

Example::

    $ vault inspect model.vault
    $ vault demo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..core.errors import VaultError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vault",
        description="Seal, license and run protected ONNX models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from . import cli_device, cli_hybrid, cli_keyserver, cli_package, cli_worker

    cli_package.register(sub)
    cli_keyserver.register(sub)
    cli_device.register(sub)
    cli_worker.register(sub)
    cli_hybrid.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except VaultError as exc:
        print(f"vault: {exc.diagnostics()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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
import os
import sys
from collections.abc import Sequence

from ..core.errors import VaultError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vault",
        description="Seal, license and run protected ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"vault {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from . import cli_device, cli_hybrid, cli_keyserver, cli_package, cli_worker

    cli_package.register(sub)
    cli_keyserver.register(sub)
    cli_device.register(sub)
    cli_worker.register(sub)
    cli_hybrid.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vault-sandbox")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            rc = args.func(args)
        except VaultError as exc:
            print(f"vault: {exc.diagnostics()}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return int(rc or 0)
    except BrokenPipeError:
        # the reader went away (`vault ... | head`): stop quietly, as a command
        # killed by SIGPIPE would; nothing more is written to the closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

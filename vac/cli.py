"""The ``vac`` command: status of the whole space, configuration, accounting and tools.

Each subcommand is a ``cmd_<name>(args) -> int`` function registered in ``build_parser``.
Output goes to stdout (tables, or JSON with ``--json``); problems to stderr; the exit status is
the function's return value.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from vac import __version__
from vac.config import DEFAULT_CONF_DIR, DEFAULT_MAIN_CONF


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``vac`` and ``vacd`` to read configuration from elsewhere."""
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="fragment directory (default %(default)s)")
    parser.add_argument("--conf", default=DEFAULT_MAIN_CONF, help="main file (default %(default)s)")
    parser.add_argument("--run-conf", default=None, help="run-time file (default /run/vac.conf and /var/run/vac.conf)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vac", description="Vac VM factory: status, configuration and tools.")
    parser.add_argument("--version", action="version", version=f"vac {__version__}")
    add_config_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    # Subcommands are registered below, one block per area.
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

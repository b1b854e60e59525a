"""The ``vcycle`` command: vcycle's configuration and its status tables (from vcycled's status
files, vac.cli.vcyclestatus).

Output goes to stdout; problems to stderr as ``level: FILE:LINE: [SECTION] OPTION: MESSAGE``;
the exit status is 1 on any configuration error.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Optional

from vac import __version__
from vac.core.config import ConfigPaths
from vac.core.vcycleconfig import (
    DEFAULT_CONF_DIR,
    DEFAULT_MAIN_CONF,
    STATE_DIR,
    format_vcycle_config,
    load_vcycle_config,
)
from vac.ops.configcli import print_problems


def cmd_conf(args: argparse.Namespace) -> int:
    """Print the effective configuration with the file:line of each value (secrets hidden).

    With --check print only the problems.
    """
    paths = ConfigPaths(conf_dir=args.conf_dir, main_conf=args.conf, run_confs=())
    config, problems = load_vcycle_config(paths, hostname=socket.getfqdn())
    print_problems(problems)
    if config is None:
        return 1
    if not args.check:
        print(format_vcycle_config(config), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """A table (or JSON) of the spaces, machinetypes or machines vcycled last reported."""
    from vac.cli import vcyclestatus

    statuses, problems = vcyclestatus.load_statuses(args.state_dir, args.space)
    for problem in problems:
        print(f"vcycle: {problem}", file=sys.stderr)
    if args.json:
        print(vcyclestatus.as_json(args.command, statuses), end="")
    else:
        print(vcyclestatus.RENDERERS[args.command](statuses, time.time()), end="")
    return 0 if statuses or not problems else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcycle", description="vcycle: the vacuum model on cloud tenancies")
    parser.add_argument("--version", action="version", version=f"vcycle {__version__}")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="fragment directory (default %(default)s)")
    parser.add_argument("--conf", default=DEFAULT_MAIN_CONF, help="main file (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    conf = commands.add_parser("conf", help="show the effective configuration and where each value was set")
    conf.add_argument("--check", action="store_true", help="print only problems; exit status 1 on any error")
    conf.set_defaults(func=cmd_conf)
    for name, what in (("spaces", "each space: machines, processors, limit, backoff"),
                       ("machinetypes", "each machinetype: share, machines, score, last abort, why none is created"),
                       ("machines", "each machine: state, processors, ages, shutdown message")):
        table = commands.add_parser(name, help=what)
        table.add_argument("--state-dir", default=STATE_DIR, help="vcycled's state directory (default %(default)s)")
        table.add_argument("--space", default=None, help="only this space")
        table.add_argument("--json", action="store_true", help="JSON instead of a table")
        table.set_defaults(func=cmd_status)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

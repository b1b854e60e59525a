"""The configuration options and check shared by ``vac``, ``vacd`` and ``check-vacd``.

It lives in ops, not in a face, so that the daemon can offer ``--check-config`` without
importing the ``vac`` command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from typing import IO, Optional

from vac.core import config as configmod
from vac.core.ini import ERROR, Problem
from vac.ops.logsetup import connected_to_journal, syslog_priority


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options to read configuration from elsewhere than the default places."""
    parser.add_argument("--conf-dir", default=configmod.DEFAULT_CONF_DIR,
                        help="fragment directory (default %(default)s)")
    parser.add_argument("--conf", default=configmod.DEFAULT_MAIN_CONF,
                        help="main file (default %(default)s)")
    parser.add_argument("--run-conf", default=None,
                        help="run-time file (default /run/vac.conf and /var/run/vac.conf)")


def report_config(paths: configmod.ConfigPaths, problems_only: bool) -> int:
    """Print the effective configuration, each value with the file:line that set it (or with
    ``problems_only`` nothing but the problems). Problems go to stderr; 1 on any error."""
    config, problems = configmod.load_config(paths)
    print_problems(problems)
    if config is None:
        return 1
    if not problems_only:
        print(configmod.format_effective_config(config), end="")
    return 0


def print_problems(problems: Iterable[Problem], stream: Optional[IO] = None) -> None:
    """One ``LEVEL: file:line: ...`` line per problem on stderr. Run by systemd (a unit's
    ``ExecReload=... --check-config``), each line carries its syslog priority for journald."""
    stream = sys.stderr if stream is None else stream
    journal = connected_to_journal(stream)
    for problem in problems:
        level = logging.ERROR if problem.level == ERROR else logging.WARNING
        prefix = f"<{syslog_priority(level)}>" if journal else ""
        print(f"{prefix}{problem.level}: {problem}", file=stream)

"""Host commands for the machine backends (qemu-img, lvcreate, ip ...), never through a shell.

Its own module so that a backend's helpers (disk files, LVM) run commands without importing the
libvirt adapter, and every backend runs them the same way. It imports only the standard
library: anything that may import a backend may import it.

* ``run_command(argv, timeout=120.0) -> str``: stdout of a successful run; ``CommandError``
  with the status and stderr otherwise, or when the program is missing or times out.
* ``CommandRunner``: the type of ``run_command``; functions that run commands take one, so
  tests can record commands (LVM) instead of running them.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from typing import Callable


class CommandError(Exception):
    """A host command failed or could not be run; the message says which and why."""


CommandRunner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str], timeout: float = 120.0) -> str:
    """Run ``argv`` (never through a shell) and return its stdout; raise CommandError on failure.

    The C locale keeps output parseable; LVM_SUPPRESS_FD_WARNINGS quiets LVM about inherited fds.
    """
    env = dict(os.environ, LC_ALL="C", LVM_SUPPRESS_FD_WARNINGS="1")
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                env=env, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommandError(f"{argv[0]}: {error}") from error
    if result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip() or "no output"
        raise CommandError(f"{_brief(argv)} failed with status {result.returncode}: "
                           f"{detail[-MAX_DETAIL_CHARS:]}")
    return result.stdout


MAX_COMMAND_CHARS = 200  # a container's run command has dozens of options: keep log lines short
MAX_DETAIL_CHARS = 500


def _brief(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= MAX_COMMAND_CHARS else text[:MAX_COMMAND_CHARS] + " ..."

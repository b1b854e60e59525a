"""vac.backends.commands: host commands run without a shell, failures said clearly."""

from __future__ import annotations

import pytest

from vac.backends.commands import CommandError, run_command


def test_run_command_returns_stdout():
    assert run_command(["/bin/echo", "a;b $HOME"]) == "a;b $HOME\n"  # no shell in between


def test_run_command_failure_names_status_and_stderr():
    with pytest.raises(CommandError, match="status 3: boom"):
        run_command(["/bin/sh", "-c", "echo boom >&2; exit 3"])


def test_run_command_reports_missing_programs_and_timeouts():
    with pytest.raises(CommandError, match="no-such-program"):
        run_command(["/nonexistent/no-such-program"])
    with pytest.raises(CommandError, match="timed out"):
        run_command(["/bin/sleep", "5"], timeout=0.1)


def test_the_c_locale_keeps_output_parseable():
    assert run_command(["/bin/sh", "-c", "echo $LC_ALL"]) == "C\n"

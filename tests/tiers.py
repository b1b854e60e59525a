"""Test tiers that need more than Python (root, libvirtd, podman, systemd-nspawn, ...).

Where a tier's prerequisites are missing its tests are skipped, except where ``scripts/run-tests``
has set the tier up and said so with the tier's variable set to 1 (``VAC_REQUIRE_SYSTEM``,
``VAC_REQUIRE_CONTAINER``, ``VAC_REQUIRE_SYSTEMD``): there a missing prerequisite fails, so CI
can never pass by skipping a tier.
"""

from __future__ import annotations

import os
from typing import Optional

SYSTEM = "VAC_REQUIRE_SYSTEM"
CONTAINER = "VAC_REQUIRE_CONTAINER"
SYSTEMD = "VAC_REQUIRE_SYSTEMD"


def require(variable: str, reason: Optional[str]) -> None:
    """With a ``reason`` the tier cannot run: fail if ``variable`` is 1, else skip for ``reason``.
    Without one (None or ""), nothing."""
    # Imported here: scripts/quickstart imports tests.containerimage where pytest is not installed.
    import pytest

    if not reason:
        return
    if os.environ.get(variable) == "1":
        pytest.fail(f"{variable}=1 but {reason}")
    pytest.skip(reason)

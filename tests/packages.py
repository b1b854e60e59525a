"""The RPMs built from this work tree, for the packaging tests and the systemd tier."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

from vac import __version__

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "vac.spec"
EXCLUDED_FROM_TARBALL = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist",
                         ".hypothesis"}
# Local environments and test caches at the top of the work tree (scripts/run-tests).
EXCLUDED_AT_TOP = {".venv", "guest", "systemd-root"}


def source_tarball(path: Path) -> None:
    """vac-VERSION.tar.gz of the work tree, as a release tarball would be."""
    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if any(part in EXCLUDED_FROM_TARBALL or part.endswith(".egg-info") for part in parts):
            return None
        if len(parts) > 1 and parts[1] in EXCLUDED_AT_TOP:
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(path, "w:gz") as tarball:
        tarball.add(REPO, arcname=f"vac-{__version__}", filter=keep)


def build_rpms(topdir: Path) -> dict:
    """Build vac and vac-command with rpmbuild under ``topdir``: {package name: .rpm path}.

    Raises AssertionError with rpmbuild's output if the build fails.
    """
    (topdir / "SOURCES").mkdir(parents=True, exist_ok=True)
    source_tarball(topdir / "SOURCES" / f"vac-{__version__}.tar.gz")
    # --nodeps: the build host is not EL, its rpm database knows no BuildRequires.
    done = subprocess.run(["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {topdir}", str(SPEC)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LC_ALL": "C"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {path.name.rsplit("-", 2)[0]: path for path in (topdir / "RPMS" / "noarch").glob("*.rpm")}

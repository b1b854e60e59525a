import shutil
import subprocess
from pathlib import Path

import pytest

MAN_DIR = Path(__file__).resolve().parent.parent / "man"
PAGES = sorted(path for path in MAN_DIR.glob("*.[158]") if path.is_file())


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_man_page_formats_without_warnings(page):
    done = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stderr


def test_pages_exist_and_are_named_after_their_section():
    names = {page.name for page in PAGES}
    assert {"vac.1", "vacd.8", "check-vacd.8"} <= names
    for page in PAGES:
        header = next(line for line in page.read_text().splitlines() if line.startswith(".TH "))
        title, section = header.split()[1:3]
        assert (title.lower(), section) == (page.stem.lower(), page.suffix[1:]), page.name

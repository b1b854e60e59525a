import json
import logging
import os
import re

import pytest

from vac.ops import logsetup
from vac.ops.logsetup import connected_to_journal, setup_logging, syslog_priority

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    if logsetup._installed is not None:
        root.removeHandler(logsetup._installed)
        logsetup._installed.close()
        logsetup._installed = None
    root.setLevel(level)
    assert root.handlers == handlers


def journal_env(path) -> dict:
    status = os.stat(path)
    return {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


def test_syslog_priorities():
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]


def test_journal_detection_compares_device_and_inode(tmp_path):
    journal, other = tmp_path / "journal", tmp_path / "other"
    journal.touch()
    other.touch()
    with open(journal, "w") as stream:
        assert connected_to_journal(stream, journal_env(journal))
    with open(other, "w") as stream:
        assert not connected_to_journal(stream, journal_env(journal))
        assert not connected_to_journal(stream, {})
        assert not connected_to_journal(stream, {"JOURNAL_STREAM": "garbage"})


def test_journal_lines_carry_priority_and_no_timestamp(tmp_path):
    path = tmp_path / "journal"
    path.touch()
    with open(path, "w") as stream:
        setup_logging(stream=stream, environ=journal_env(path))
        logging.getLogger("vac.test").info("started")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("vac.test").exception("creation failed")
    lines = path.read_text().splitlines()
    assert lines[0] == "<6>INFO vac.test: started"
    assert lines[1] == "<3>ERROR vac.test: creation failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines[2:])
    assert lines[-1] == "<3>RuntimeError: boom"


def test_terminal_lines_have_timestamps(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        setup_logging(stream=stream, environ={}, level=logging.DEBUG)
        logging.getLogger("vac.test").debug("detail")
    line = path.read_text()
    assert TIMESTAMP.match(line)
    assert line.rstrip().endswith(f"vac.test[{os.getpid()}] DEBUG: detail")


def test_file_log_is_reopened_after_rotation(tmp_path):
    path = tmp_path / "vacd.log"
    setup_logging(log_file=str(path))
    log = logging.getLogger("vac.test")
    log.warning("before rotation")
    os.rename(path, tmp_path / "vacd.log.1")  # what logrotate does
    log.warning("after rotation")
    assert "before rotation" in (tmp_path / "vacd.log.1").read_text()
    rotated = path.read_text()
    assert TIMESTAMP.match(rotated) and "after rotation" in rotated and "before" not in rotated


def test_info_is_default_level(tmp_path):
    path = tmp_path / "vacd.log"
    setup_logging(log_file=str(path))
    logging.getLogger("vac.test").debug("hidden")
    logging.getLogger("vac.test").info("shown")
    assert "hidden" not in path.read_text() and "shown" in path.read_text()


def test_json_lines(tmp_path):
    path = tmp_path / "vacd.log"
    setup_logging(log_file=str(path), log_format="json")
    logging.getLogger("vac.test").warning('quote " and\nnewline')
    entry = json.loads(path.read_text())
    assert entry["level"] == "WARNING" and entry["logger"] == "vac.test" and entry["pid"] == os.getpid()
    assert entry["message"] == 'quote " and\nnewline'
    assert entry["time"].endswith("+00:00")


def test_setup_twice_replaces_the_handler(tmp_path):
    first = setup_logging(log_file=str(tmp_path / "a.log"))
    second = setup_logging(log_file=str(tmp_path / "b.log"))
    assert first not in logging.getLogger().handlers and second in logging.getLogger().handlers


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup_logging(log_format="xml")

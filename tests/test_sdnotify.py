import os
import socket
import uuid

import pytest

from vac.ops.sdnotify import SystemdNotifier, socket_address, watchdog_interval


@pytest.fixture
def listener(tmp_path):
    """A real AF_UNIX datagram socket standing in for systemd, with a recv helper."""
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    yield path, lambda: server.recv(4096).decode()
    server.close()


def test_socket_address_forms():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == "\0abstract/name"
    assert socket_address("relative/path") is None
    assert socket_address("") is None
    assert socket_address(None) is None


def test_watchdog_interval_is_half_of_usec_for_this_process():
    assert watchdog_interval({"WATCHDOG_USEC": "180000000"}, pid=42) == 90.0
    assert watchdog_interval({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "42"}, pid=42) == 90.0


def test_watchdog_interval_off_cases():
    assert watchdog_interval({}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "43"}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, pid=42) is None


def test_without_notify_socket_everything_is_a_no_op():
    notifier = SystemdNotifier(environ={})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_seconds is None


@pytest.mark.component
def test_messages_arrive_on_a_path_socket(listener):
    path, receive = listener
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.ready("0/8 machines running")
    assert receive() == "READY=1\nSTATUS=0/8 machines running"
    assert notifier.status("line one\nline two")
    assert receive() == "STATUS=line one line two"
    assert notifier.watchdog()
    assert receive() == "WATCHDOG=1"
    assert notifier.stopping()
    assert receive() == "STOPPING=1"
    assert notifier.reloading()
    reloading, monotonic = receive().split("\n")
    assert reloading == "RELOADING=1"
    assert monotonic.startswith("MONOTONIC_USEC=") and int(monotonic.split("=")[1]) > 0
    notifier.close()


@pytest.mark.component
def test_messages_arrive_on_an_abstract_socket():
    name = f"vac-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
    finally:
        server.close()


@pytest.mark.component
def test_missing_socket_is_reported_not_raised(tmp_path, caplog):
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "absent")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert "sd_notify" in caplog.text


def test_malformed_assignment_is_rejected():
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(ValueError):
        notifier.send("READY")
    with pytest.raises(ValueError):
        notifier.send("STATUS=a\nREADY=1")


def test_unset_environment_hides_variables_from_children():
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = SystemdNotifier(environ=environ, unset_environment=True)
    assert notifier.enabled and notifier.watchdog_seconds == 2.0
    assert environ == {"PATH": "/bin"}

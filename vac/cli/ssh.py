"""``vac ssh``: finding a machine in the space and the ``ssh`` command line that reaches it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

from vac.cli.tables import short_name
from vac.core.config import Settings
from vac.core.model import slot_ip
from vac.services.vacquery import MachineStatus, factory_address


def find_machine(reports: Iterable[MachineStatus], wanted: str) -> list:
    """Slots whose machine name, short name or UUID is ``wanted``."""
    return [machine for machine in reports
            if wanted in (machine.machine, short_name(machine.machine)) or machine.uuid == wanted]


def slot_of(machine_name: str) -> Optional[int]:
    """The slot ordinal in a machine name ``host-NN.domain``, or None."""
    _, dash, digits = short_name(machine_name).rpartition("-")
    return int(digits) if dash and digits.isdigit() else None


def ssh_argv(machine: MachineStatus, settings: Settings, command: Sequence[str] = ()) -> list:
    """``ssh`` to ``machine`` as root with the factory key, through its factory unless that is
    this host. Host keys are not recorded: every machine boots with new ones, and the
    clean-traffic filter stops other machines from taking a slot's address.
    ValueError if the name has no slot number or root_public_key does not end in ``.pub``."""
    ordinal = slot_of(machine.machine)
    if ordinal is None:
        raise ValueError(f"{machine.machine} is not a slot name (host-NN.domain)")
    public_key = settings.root_public_key
    if not public_key.endswith(".pub"):
        raise ValueError(f"root_public_key {public_key} does not end in .pub, so its private key "
                         "cannot be found")
    argv = ["ssh", "-i", public_key[:-len(".pub")], "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]
    if machine.factory != settings.factory_name:
        argv += ["-J", factory_address(machine.factory, settings).address or machine.factory]
    return argv + [f"root@{slot_ip(ordinal)}", *command]

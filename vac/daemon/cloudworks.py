"""The machine works of vcycled's spaces: vac's MachineWorks with a per-machine MJF token,
the HTTPS MJF and heartbeat-list URLs in user_data, and Vcycle's accounting."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Optional

from vac import __version__
from vac.core import vcycleplan
from vac.core.config import Machinetype, Settings
from vac.core.model import Finish, Machine
from vac.daemon.machines import MachineWorks
from vac.records import apel
from vac.records.store import Store, atomic_write
from vac.services import cloudmjf

log = logging.getLogger("vcycled")

TOKEN_FILE = "mjf_token"
HEARTBEAT_LISTS_DIR = "heartbeatlists"  # in the space's state directory, one file per machinetype


class CloudWorks(MachineWorks):
    """MachineWorks for cloud machines: a per-machine MJF token and the HTTPS MJF URLs in
    user_data (with the heartbeat lists' URL and the cvmfs proxies made of them), APEL records
    with Vcycle's infrastructure values and wall time as CPU time, and only aborts (300-699)
    kept as finishes."""

    def __init__(self, store: Store, settings: Settings, https: tuple[str, int], space: str):
        super().__init__(store, settings)
        self.https_host, self.https_port = https
        self.space = space
        self.tokens: dict[str, str] = {}  # machine name -> MJF token
        self.dirs: dict[str, Path] = {}  # machine name -> directory
        self.heartbeat_lists = store.root / HEARTBEAT_LISTS_DIR
        self.cvmfs_proxies: dict[str, str] = {}  # machinetype -> user_data_option_cvmfs_proxy

    def prepare(self, machine: Machine, machinetype: Machinetype, settings: Settings) -> Path:
        self.tokens[machine.name] = secrets.token_urlsafe(24)
        try:
            directory = super().prepare(machine, machinetype, settings)
            atomic_write(directory / TOKEN_FILE, self.tokens[machine.name], 0o600)
        except BaseException:
            self.tokens.pop(machine.name, None)
            raise
        self.dirs[machine.name] = directory
        return directory

    def user_data_overrides(self, machine: Machine, directory: Path) -> dict[str, str]:
        base = cloudmjf.machine_url(self.https_host, self.https_port, self.space, machine.name,
                                    self.tokens[machine.name])
        manager = f"Vcycle {__version__}"
        return {"user_data_machinefeatures_url": f"{base}/machinefeatures",
                "user_data_jobfeatures_url": f"{base}/jobfeatures",
                "user_data_joboutputs_url": f"{base}/joboutputs",
                # The machine adds /<machinetype>, as with classic Vcycle's URL.
                "user_data_heartbeat_machines_url": f"{base}/{cloudmjf.HEARTBEAT_LISTS}",
                "user_data_manager_version": manager, "user_data_vmlm_version": manager,
                **({"user_data_option_cvmfs_proxy": self.cvmfs_proxies[machine.machinetype]}
                   if machine.machinetype in self.cvmfs_proxies else {})}

    def index(self, machine: Machine) -> None:
        """Serve the MJF of a machine found again (a restart, a take-over)."""
        directory = self.store.machine_dir(machine)
        try:
            self.tokens[machine.name] = (directory / TOKEN_FILE).read_text(encoding="ascii").strip()
        except OSError:
            log.warning("space %s: %s has no MJF token: its MJF URLs cannot be served", self.space, machine.name)
            return
        self.dirs[machine.name] = directory

    def forget(self, machine: Machine) -> None:
        self.tokens.pop(machine.name, None)
        self.dirs.pop(machine.name, None)

    def mjf_files(self, name: str) -> Optional[cloudmjf.CloudMachineFiles]:
        token, directory = self.tokens.get(name), self.dirs.get(name)
        return cloudmjf.CloudMachineFiles(directory, token, self.heartbeat_lists) if token and directory else None

    def account(self, settings: Settings, machinetype: Machinetype, machine: Machine, end: float) -> None:
        # Clouds report no CPU time: CpuDuration is the wall time (classic Vcycle).
        wall = max(0.0, end - (machine.started or machine.created))
        result = apel.write_accounting(settings, machinetype, machine, end, wall, apel.VCYCLE)
        log.info("space %s: %s", self.space, result)

    def save_finish(self, finish: Finish) -> None:
        if vcycleplan.is_abort(finish.shutdown_message):
            super().save_finish(finish)

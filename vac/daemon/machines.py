"""What the daemon keeps and writes for machines, whatever runs them (the executor's ``Records``).

A machine's directory is prepared here before its backend starts it, the same for every backend:
the record and slot file, Machine/Job Features, ``accounting_fqan``, the root public key (VMs)
and ``user_data`` (0600: it may hold a proxy). Accounting (APEL), the MJF deadline files and
the store's reads and writes of the machine's files go through here too. Every method may
block; the executor calls the slow ones through its runtime's thread pool.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from vac.backends.vm import disks
from vac.content import imagecache, userdata
from vac.core.config import CONTAINER_MODELS, MACHINE_MODELS, Machinetype, Settings
from vac.core.model import Finish, Machine
from vac.records import apel
from vac.records.store import Store
from vac.services import metadata

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "joboutputs/shutdown_message"


class MachineWorks:
    """The store, MJF, user_data and APEL sides of machines."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.images: Optional[imagecache.ImageCache] = None

    def check_storage(self) -> None:
        """DiskError unless the configured volume group exists (classic: a config error)."""
        if self.settings.volume_group:
            disks.volume_group_size(self.settings.volume_group)

    def complete_accounting(self) -> None:
        """Finish publishing records a crash interrupted (see vac.records.apel)."""
        completed = apel.complete_pending(self.settings)
        if completed:
            log.info("completed %d interrupted APEL records", completed)

    # -- preparing a machine -------------------------------------------------------------------

    def prepare(self, machine: Machine, machinetype: Machinetype, settings: Settings) -> Path:
        """Write the machine's directory (record, slot, MJF, keys, user_data); return it."""
        now = time.time()
        directory = self.store.create_machine_dir(machine)
        if machinetype.machine_model in CONTAINER_MODELS:
            # The container's processes (apptainer's run as singularity_user) reach their binds
            # through these directories.
            for path in (directory.parent, directory):
                os.chmod(path, 0o755)
        machinefeatures, jobfeatures = metadata.mjf_features(machine, settings, machinetype, now)
        metadata.write_mjf(directory, machinefeatures, jobfeatures)
        if machinetype.accounting_fqan:
            self.store.write_file(machine, "accounting_fqan", machinetype.accounting_fqan)
        if machinetype.machine_model in MACHINE_MODELS:
            self._copy_public_key(machine, settings)
        template, url = userdata.fetch_template(machinetype, settings)
        proxy = None
        if machinetype.user_data_proxy:
            from vac.content import x509

            proxy = x509.machinetype_proxy(machinetype, machine.deadline, now)
        text = userdata.build_user_data(template, settings=settings, machinetype=machinetype,
                                        machine=machine, template_url=url, proxy_pem=proxy,
                                        overrides=self.user_data_overrides(machine, directory))
        self.store.write_file(machine, "user_data", text, mode=0o600)
        return directory

    def user_data_overrides(self, machine: Machine, directory: Path) -> dict[str, str]:
        """Substitutions that replace the defaults in ``user_data`` (vcycled: the MJF URLs of
        its HTTPS service); vacd's machines read MJF from the metadata service: none."""
        return {}

    def _copy_public_key(self, machine: Machine, settings: Settings) -> None:
        try:
            key = Path(settings.root_public_key).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return  # optional: VMs then get no public key
        self.store.write_file(machine, "root_public_key", key)

    def vm_root_image(self, machinetype: Machinetype) -> Optional[Path]:
        """A VM machinetype's root image as a local file (downloaded into the image cache), its
        signature checked where ``image_signing_dn`` asks for it; LibvirtBackend calls this."""
        if not machinetype.root_image:
            return None
        if self.images is None:
            self.images = imagecache.ImageCache(Path(self.settings.state_dir) / "imagecache")
        image = imagecache.resolve_root_image(machinetype, self.images)
        if machinetype.image_signing_dn and machinetype.machine_model != "vm-raw":
            from vac.content import x509

            x509.verify_cernvm_image(str(image), machinetype.image_signing_dn)
        return image

    # -- the machine's files and records -------------------------------------------------------

    def machine_dir(self, machine: Machine) -> Path:
        return self.store.machine_dir(machine)

    def save(self, machine: Machine) -> None:
        self.store.save(machine)

    def vm_shutdown_message(self, machine: Machine) -> Optional[str]:
        return self.store.vm_shutdown_message(machine)

    def write_shutdown_message(self, machine: Machine, message: str) -> None:
        self.store.write_file(machine, SHUTDOWN_MESSAGE, message)

    def last_activity(self, machine: Machine) -> Optional[float]:
        return self.store.last_activity(machine)

    def lower_deadline(self, machine: Machine) -> None:
        metadata.lower_deadline_files(self.store.machine_dir(machine), machine.deadline)

    def account(self, settings: Settings, machinetype: Machinetype, machine: Machine,
                end: float) -> None:
        result = apel.write_accounting(settings, machinetype, machine, end, machine.cpu_seconds)
        log.info("accounting for %s: %s", machine.name, result)

    def save_finish(self, finish: Finish) -> None:
        self.store.save_finish(finish)

    def release_slot(self, machine: Machine) -> None:
        self.store.release_slot(machine)

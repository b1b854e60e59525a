"""What a running vacd does with a changed ``[settings]`` option: use it from the next cycle, or
keep the value it started with until it is restarted.

``RESTART_NEEDED`` is the one declaration of the second kind; vac.conf(5) marks the same options
"restart needed". Every other setting, and every machinetype and vacuum pipe option, takes
effect at the next cycle after the configuration is read again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from vac.core.config import Config, Machinetype, Settings

RESTART_NEEDED = frozenset({
    # where vacd keeps its state and which hypervisor it drives
    "state_dir", "libvirt_uri", "volume_group",
    # the factory's network: one DHCP entry named after the factory per slot, the service
    # addresses on its bridge; it is defined once, when vacd connects to libvirt
    "factory_name", "total_processors", "network_name", "network_forward", "bridge_name",
    "forward_dev", "metadata_address", "mjf_address",
    # sockets bound at start, and the limits the MJF service was started with
    "http_port", "vacquery_address", "vacquery_port", "metrics_port",
    "joboutputs_file_max_bytes", "joboutputs_total_max_bytes", "joboutputs_max_files",
    # the container backends are made with these when a machinetype first needs them, and the
    # containers they run are found and stopped through the same engine and account
    "container_engine", "container_runtime", "container_network", "singularity_user",
})


def config_after_reload(running: Settings, loaded: Config) -> tuple[Config, dict]:
    """``loaded`` with every restart-needed option kept at its ``running`` value, and
    ``{option: loaded value}`` of the restart-needed options whose value differs.

    Machinetypes keep their directories under the running ``state_dir`` too."""
    settings = loaded.settings
    waiting = {name: getattr(settings, name) for name in sorted(RESTART_NEEDED)
               if getattr(settings, name) != getattr(running, name)}
    kept = {name: getattr(running, name) for name in waiting}
    machinetypes = loaded.machinetypes
    if "state_dir" in waiting:
        machinetypes = {name: _moved(machinetype, settings.state_dir, running.state_dir)
                        for name, machinetype in machinetypes.items()}
    return loaded.replace(settings=dataclasses.replace(settings, **kept),
                          machinetypes=machinetypes), waiting


def _moved(machinetype: Machinetype, loaded_dir: str, running_dir: str) -> Machinetype:
    path = machinetype.machinetype_path
    if os.path.commonpath([path, loaded_dir]) != loaded_dir:
        return machinetype
    return dataclasses.replace(machinetype, machinetype_path=os.path.join(
        running_dir, os.path.relpath(path, loaded_dir)))


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    return '""' if value == "" else str(value)


class RestartNotices:
    """Decides which reloads of the settings need saying that a change waits for a restart:
    each change once, however often the configuration is read again while it waits."""

    def __init__(self) -> None:
        self.waiting: dict = {}  # option -> the value that waits for a restart

    def review(self, running: Settings, loaded: Config) -> tuple[Config, list]:
        """The configuration to use from now on, and the lines to log (one per new change)."""
        effective, waiting = config_after_reload(running, loaded)
        lines = [f"{name} changed from {_shown(getattr(running, name))} to {_shown(value)}: "
                 f"this needs a restart of vacd; keeping {_shown(getattr(running, name))} "
                 "until then"
                 for name, value in waiting.items()
                 if name not in self.waiting or self.waiting[name] != value]
        self.waiting = waiting
        return effective, lines

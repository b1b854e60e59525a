"""The daemon's machine backends, by machine model, made and connected only where used.

cernvm3, cernvm4 and vm-raw run on libvirt (``LibvirtBackend``), docker and podman on the
configured engine (``EngineBackend``), singularity and apptainer on apptainer
(``ApptainerBackend``). A backend is made when some machinetype (or a live machine) uses one of
its models. libvirt is waited for at start, as before containers existed; a container backend
that cannot connect (podman or apptainer missing) is logged once, its machinetypes are refused
(the planner sees them with no target share) and it is tried again on every reconcile.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Callable, Optional

from vac.backends.base import MachineBackend, StoppedCallback
from vac.core.config import APPTAINER_MODELS, ENGINE_MODELS, MACHINE_MODELS, Config, Settings

log = logging.getLogger("vacd")

LIBVIRT = "libvirt"
MODEL_BACKENDS = {**dict.fromkeys(MACHINE_MODELS, LIBVIRT), **dict.fromkeys(ENGINE_MODELS, "engine"),
                  **dict.fromkeys(APPTAINER_MODELS, "apptainer")}

# maker(settings, on_stopped, on_reconnected, works): the backend, not yet connected.
Maker = Callable[[Settings, StoppedCallback, Callable[[], None], object], MachineBackend]


def _libvirt(settings, on_stopped, on_reconnected, works) -> MachineBackend:
    from vac.backends.vm.backend import LibvirtBackend

    return LibvirtBackend(settings, on_stopped, on_reconnected, works.vm_root_image)


def _engine(settings, on_stopped, _on_reconnected, _works) -> MachineBackend:
    from vac.backends.container.engine import EngineBackend

    return EngineBackend.from_settings(settings, on_stopped)


def _apptainer(settings, on_stopped, _on_reconnected, _works) -> MachineBackend:
    from vac.backends.container.apptainer import ApptainerBackend

    return ApptainerBackend.from_settings(settings, on_stopped)


DEFAULT_MAKERS: dict[str, Maker] = {LIBVIRT: _libvirt, "engine": _engine, "apptainer": _apptainer}


class Backends:
    """The backends a factory uses (the executor's ``BackendSet``). Methods that connect block:
    the daemon calls them in its thread pool."""

    def __init__(self, makers: dict[str, Maker], settings: Settings, on_stopped: StoppedCallback,
                 on_reconnected: Callable[[], None], works: object):
        self.makers = makers
        self.settings = settings
        self.on_stopped = on_stopped
        self.on_reconnected = on_reconnected
        self.works = works
        self.made: dict[str, MachineBackend] = {}
        self.connected: dict[str, MachineBackend] = {}
        self.failed: dict[str, str] = {}  # key -> why it cannot connect (logged once)

    @staticmethod
    def needed(config: Config, models: Iterable[str] = ()) -> set[str]:
        """Keys of the backends that ``config``'s machinetypes and the ``models`` of live
        machines use."""
        used = {mt.machine_model for mt in config.machinetypes.values()} | set(models)
        return {MODEL_BACKENDS[model] for model in used if model in MODEL_BACKENDS}

    def make(self, key: str) -> MachineBackend:
        if key not in self.made:
            self.made[key] = self.makers[key](self.settings, self.on_stopped, self.on_reconnected,
                                              self.works)
        return self.made[key]

    def connect(self, key: str) -> None:
        """Connect one backend (blocking); BackendError (or HypervisorError) if it cannot."""
        self.make(key).connect()
        self.connected[key] = self.made[key]
        if self.failed.pop(key, None) is not None:
            log.info("the %s backend is connected: its machinetypes may be created again", key)

    def try_connect(self, keys: Iterable[str]) -> None:
        """Connect those of ``keys`` not yet connected; log a failure once, refusing the
        machinetypes of that backend until it connects."""
        for key in sorted(set(keys) - set(self.connected)):
            try:
                self.connect(key)
            except Exception as error:
                if self.failed.get(key) != str(error):
                    log.error("the %s backend cannot be used: %s; its machinetypes (%s) are not "
                              "created until it can", key, error,
                              ", ".join(m for m, k in MODEL_BACKENDS.items() if k == key))
                self.failed[key] = str(error)

    def close(self) -> None:
        for backend in self.made.values():
            try:
                backend.close()
            except Exception as error:
                log.warning("closing the %s backend: %s", backend.kind, error)
        self.connected.clear()

    # -- the executor's BackendSet ---------------------------------------------------------------

    def for_model(self, model: str) -> Optional[MachineBackend]:
        key = MODEL_BACKENDS.get(model)
        return self.connected.get(key) if key else None

    def listable(self) -> dict[str, MachineBackend]:
        return dict(self.connected)

    def key_of_model(self, model: str) -> Optional[str]:
        return MODEL_BACKENDS.get(model)

    def refused(self, config: Config) -> Config:
        """``config`` with no target share for machinetypes whose backend is not connected,
        so the planner creates none of them (their running machines are still reported)."""
        refused = {name for name, mt in config.machinetypes.items() if mt.target_share > 0
                   and MODEL_BACKENDS.get(mt.machine_model) not in self.connected}
        if not refused:
            return config
        return config.replace(machinetypes={
            name: dataclasses.replace(mt, target_share=0.0) if name in refused else mt
            for name, mt in config.machinetypes.items()})

"""The libvirt connection: domains and their events, reconnection, the factory network.

``Hypervisor`` is one libvirt connection with lifecycle events, reconnection after a libvirtd
restart, idempotent destroy, and listing of vac domains with the identity stored in their XML
(vac.backends.vm.domain makes that XML). Its methods block; vacd calls them from its thread pool
through vac.backends.vm.backend's ``LibvirtBackend``.

Events arrive on libvirt's native event-loop thread and are handed to the ``event_sink`` given
to ``Hypervisor`` as ``DomainEvent`` objects; the sink must be thread-safe and quick (for example
``loop.call_soon_threadsafe(queue.put_nowait, event)``).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import threading
import xml.etree.ElementTree as ET
from typing import Callable, Optional

import libvirt

from vac.backends.base import BackendError, BackendUnavailableError
from vac.backends.commands import CommandError, CommandRunner, run_command
from vac.backends.vm.domain import VAC_XML_NAMESPACE, DomainSpec, MachineMetadata, NetworkSpec

log = logging.getLogger(__name__)


class HypervisorError(BackendError):
    """A libvirt or host operation failed; ``code`` is the libvirt error code if there is one."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.code = code


class NotConnectedError(HypervisorError, BackendUnavailableError):
    """libvirtd cannot be reached (yet); the adapter keeps trying to reconnect."""


class EventKind(str, enum.Enum):
    """libvirt lifecycle events, plus the adapter's own connection events (uuid None)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"  # the guest powered off; STOPPED follows when libvirt has cleaned up
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"
    UNKNOWN = "unknown"
    CONNECTION_LOST = "connection-lost"
    RECONNECTED = "reconnected"  # events may have been missed: reconcile


_LIFECYCLE_KINDS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: EventKind.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: EventKind.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: EventKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: EventKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: EventKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: EventKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: EventKind.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: EventKind.PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: EventKind.CRASHED,
}


@dataclasses.dataclass(frozen=True)
class DomainEvent:
    kind: EventKind
    uuid: Optional[str] = None
    name: Optional[str] = None
    detail: int = 0  # libvirt's VIR_DOMAIN_EVENT_<KIND>_* detail code
    # SHUTDOWN only: the CPU time of the domain's QEMU process as the event arrived, its total
    # (the guest has powered off); None if it could not be read (libvirtd on another host).
    cpu_seconds: Optional[float] = None

    @property
    def stopped(self) -> bool:
        """The domain is gone for good (a transient domain no longer exists)."""
        return self.kind is EventKind.STOPPED


class DomainState(str, enum.Enum):
    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # being shut down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @classmethod
    def from_libvirt(cls, state: int) -> DomainState:
        names = ("nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed",
                 "pmsuspended")
        return cls(names[state]) if 0 <= state < len(names) else cls.NOSTATE

    @property
    def active(self) -> bool:
        return self not in (DomainState.SHUTOFF, DomainState.CRASHED, DomainState.NOSTATE)


@dataclasses.dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    state: DomainState
    cpu_seconds: float
    metadata: Optional[MachineMetadata]  # None: not a vac domain

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def is_vac(self) -> bool:
        return self.metadata is not None


QEMU_SYSTEM_PID_DIR = "/run/libvirt/qemu"  # libvirtd's <domain name>.pid files (qemu:///system)

_event_loop_lock = threading.Lock()
_event_loop_thread: Optional[threading.Thread] = None


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; they are raised as exceptions anyway."""


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it on a daemon thread, once.

    Must happen before the connection that wants events is opened (STANDARDS.md §A6).
    """
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_loop_thread.start()


def _error_code(error: libvirt.libvirtError) -> int:
    return error.get_error_code() or 0


def qemu_cpu_seconds(pid_dir: str, domain_name: str) -> Optional[float]:
    """CPU time (utime + stime, all threads) of a local domain's QEMU process, read from
    /proc with the pid libvirtd wrote to ``pid_dir``; None if there is no such QEMU process."""
    try:
        with open(os.path.join(pid_dir, f"{domain_name}.pid"), encoding="ascii") as handle:
            pid = int(handle.read().split()[0])
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except (OSError, ValueError, IndexError):
        return None
    # "PID (COMMAND) STATE PPID ...": the command may hold spaces and parentheses.
    command, _, rest = stat.partition("(")[2].rpartition(")")
    fields = rest.split()
    if not command.startswith("qemu") or len(fields) < 13 or not all(
            field.isdigit() for field in fields[11:13]):
        return None  # a stale pid file, and the pid is some other process's now
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(domain: libvirt.virDomain) -> float:
    """The CPU time of the domain's whole QEMU process (every vCPU and I/O thread): one
    virDomainGetInfo, which libvirt answers from /proc (vac domains have no balloon for it to
    ask QEMU about). libvirt reports 0 once that /proc entry is gone."""
    return domain.info()[4] / 1e9


class Hypervisor:
    """One libvirt connection with lifecycle events and reconnection.

    ``event_sink`` is called on libvirt's event thread with every ``DomainEvent`` (all domains
    of the connection, vac's or not), and with CONNECTION_LOST / RECONNECTED when libvirtd goes
    away and comes back; after RECONNECTED the caller should reconcile with ``list_domains``.
    """

    RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)  # then every 10 s until close()

    def __init__(self, uri: str, event_sink: Callable[[DomainEvent], None],
                 command_runner: CommandRunner = run_command, pid_dir: Optional[str] = None):
        self.uri = uri
        self.event_sink = event_sink
        self.command_runner = command_runner
        # Where libvirtd keeps each running domain's QEMU pid, when it runs on this host.
        self.pid_dir = pid_dir or (QEMU_SYSTEM_PID_DIR if uri == "qemu:///system" else None)
        self._lock = threading.Lock()
        self._conn: Optional[libvirt.virConnect] = None
        self._closing = threading.Event()
        self._reconnector: Optional[threading.Thread] = None

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and subscribe to events; NotConnectedError if libvirtd is down."""
        self._closing.clear()
        if self._conn is not None:
            return
        conn = self._open()  # outside the lock: the close callback takes it on the event thread
        with self._lock:
            if self._conn is None:
                self._conn, conn = conn, None
        if conn is not None:  # another thread connected meanwhile
            self._discard(conn)

    def close(self) -> None:
        """Stop reconnecting and close the connection. Idempotent."""
        self._closing.set()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            self._discard(conn)
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None and reconnector.is_alive():  # it exits once it sees _closing
            reconnector.join(timeout=15)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _open(self) -> libvirt.virConnect:
        start_event_loop()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as error:
            raise NotConnectedError(f"cannot connect to {self.uri}: {error}",
                                    _error_code(error)) from error
        try:
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._on_lifecycle, None)
        except libvirt.libvirtError as error:
            conn.close()
            raise NotConnectedError(f"cannot subscribe to events of {self.uri}: {error}",
                                    _error_code(error)) from error
        try:
            conn.registerCloseCallback(self._on_close, None)
            conn.setKeepAlive(5, 3)  # a hung libvirtd is detected in ~20 s
        except libvirt.libvirtError:
            pass  # local drivers (test:///) have neither keep-alive nor a remote end to lose
        return conn

    @staticmethod
    def _discard(conn: libvirt.virConnect) -> None:
        """Drop a connection's subscriptions and close it; a dead one may refuse each step."""
        steps = [conn.unregisterCloseCallback]
        steps += [lambda callback_id=callback_id: conn.domainEventDeregisterAny(callback_id)
                  for callback_id in list(getattr(conn, "domainEventCallbackID", {}))]
        for step in steps + [conn.close]:
            try:
                step()
            except libvirt.libvirtError:
                pass

    def _connection(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None:
            raise NotConnectedError(f"not connected to {self.uri}")
        return conn

    def _on_lifecycle(self, _conn, domain, event: int, detail: int, _opaque) -> None:
        # Runs on libvirt's event thread: translate and hand over, with the CPU time of a
        # domain whose guest powered off. QEMU exits right after SHUTDOWN, and libvirtd then
        # answers queries of the domain only after its teardown (1-2 s later, with CPU time 0):
        # so QEMU's /proc entry is read directly, which takes microseconds and never blocks.
        kind = _LIFECYCLE_KINDS.get(event, EventKind.UNKNOWN)
        cpu_seconds = None
        if kind is EventKind.SHUTDOWN and self.pid_dir is not None:
            cpu_seconds = qemu_cpu_seconds(self.pid_dir, domain.name())
        try:
            self.event_sink(DomainEvent(kind, domain.UUIDString(), domain.name(), detail,
                                        cpu_seconds))
        except Exception:  # a failing sink must not kill libvirt's event thread
            log.exception("event sink failed on %s event", kind.value)

    def _on_close(self, conn, reason: int, _opaque) -> None:
        # Runs on libvirt's event thread: libvirt calls must not happen here, so a separate
        # thread discards the dead connection and reconnects with backoff.
        with self._lock:
            if self._conn is not conn or self._closing.is_set():
                return
            self._conn = None
            if self._reconnector and self._reconnector.is_alive():
                return
            reconnector = threading.Thread(target=self._reconnect, args=(conn, reason),
                                           name="libvirt-reconnect", daemon=True)
            self._reconnector = reconnector
        self.event_sink(DomainEvent(EventKind.CONNECTION_LOST, detail=reason))
        reconnector.start()  # after CONNECTION_LOST, so RECONNECTED always comes second

    def _reconnect(self, dead: libvirt.virConnect, reason: int) -> None:
        log.warning("lost the connection to %s (reason %d); reconnecting", self.uri, reason)
        self._discard(dead)
        attempt = 0
        while not self._closing.is_set():
            try:
                conn = self._open()
            except NotConnectedError as error:
                delay = self.RECONNECT_DELAYS[min(attempt, len(self.RECONNECT_DELAYS) - 1)]
                attempt += 1
                log.debug("reconnect attempt %d failed (%s); next in %.1f s", attempt, error, delay)
                self._closing.wait(delay)
                continue
            with self._lock:
                if self._closing.is_set():
                    self._discard(conn)
                    return
                self._conn = conn
            log.info("reconnected to %s after %d failed attempts", self.uri, attempt)
            self.event_sink(DomainEvent(EventKind.RECONNECTED))
            return

    # -- domains -----------------------------------------------------------------------------

    def _lookup(self, uuid: str) -> Optional[libvirt.virDomain]:
        try:
            return self._connection().lookupByUUIDString(uuid)
        except libvirt.libvirtError as error:
            if _error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot look up domain {uuid}: {error}",
                                  _error_code(error)) from error

    def create(self, spec: DomainSpec) -> None:
        """Start ``spec`` as a transient domain (it disappears when it stops)."""
        try:
            self._connection().createXML(spec.to_xml(), libvirt.VIR_DOMAIN_START_VALIDATE)
        except libvirt.libvirtError as error:
            raise HypervisorError(f"cannot create domain {spec.name} ({spec.uuid}): {error}",
                                  _error_code(error)) from error

    def is_active(self, uuid: str) -> bool:
        domain = self._lookup(uuid)
        if domain is None:
            return False
        try:
            return bool(domain.isActive())
        except libvirt.libvirtError as error:
            if _error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise HypervisorError(f"cannot query domain {uuid}: {error}",
                                  _error_code(error)) from error

    def shutdown(self, uuid: str) -> bool:
        """Ask the guest to power off (ACPI). False if the domain was not running."""
        domain = self._lookup(uuid)
        if domain is None:
            return False
        try:
            domain.shutdown()
        except libvirt.libvirtError as error:
            if _error_code(error) in (libvirt.VIR_ERR_NO_DOMAIN,
                                      libvirt.VIR_ERR_OPERATION_INVALID):
                return False
            raise HypervisorError(f"cannot shut down domain {uuid}: {error}",
                                  _error_code(error)) from error
        return True

    def destroy(self, uuid: str) -> None:
        """Power the domain off at once and forget it. Success if it is already gone.

        Error handling follows Nova's ``_destroy`` (STANDARDS.md §A4): NO_DOMAIN is success,
        OPERATION_INVALID is success if the domain is shut off, anything else raises
        HypervisorError (the caller retries later). A persistent domain is also undefined.
        """
        domain = self._lookup(uuid)
        if domain is None:
            return
        try:
            domain.destroy()
        except libvirt.libvirtError as error:
            code = _error_code(error)
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                return
            if code != libvirt.VIR_ERR_OPERATION_INVALID or self.is_active(uuid):
                raise HypervisorError(f"cannot destroy domain {uuid}: {error}", code) from error
        try:
            if domain.isPersistent():
                domain.undefine()
        except libvirt.libvirtError as error:
            if _error_code(error) != libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"cannot undefine domain {uuid}: {error}",
                                      _error_code(error)) from error

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        """CPU time the domain has used, or None if it does not exist."""
        domain = self._lookup(uuid)
        if domain is None:
            return None
        try:
            return _cpu_seconds(domain)
        except libvirt.libvirtError as error:
            if _error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"cannot read CPU time of {uuid}: {error}",
                                  _error_code(error)) from error

    def list_domains(self, include_foreign: bool = False) -> list[DomainInfo]:
        """Every vac domain (with its metadata) on the connection, active or not.

        ``include_foreign`` adds domains without vac metadata (``metadata`` None).
        """
        try:
            domains = self._connection().listAllDomains(0)
        except libvirt.libvirtError as error:
            raise HypervisorError(f"cannot list domains: {error}", _error_code(error)) from error
        result = []
        for domain in domains:
            try:
                info = self._describe(domain)
            except libvirt.libvirtError as error:
                if _error_code(error) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # vanished while we looked
                raise HypervisorError(f"cannot describe domain: {error}",
                                      _error_code(error)) from error
            if info.is_vac or include_foreign:
                result.append(info)
        return result

    @staticmethod
    def _describe(domain: libvirt.virDomain) -> DomainInfo:
        metadata = None
        try:
            text = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, VAC_XML_NAMESPACE)
        except libvirt.libvirtError as error:
            if _error_code(error) != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise
        else:
            try:
                metadata = MachineMetadata.from_xml(text)
            except ValueError as error:
                log.warning("domain %s has unreadable vac metadata: %s", domain.name(), error)
        state, _max_memory, _memory, _vcpus, cpu_time = domain.info()
        return DomainInfo(uuid=domain.UUIDString(), name=domain.name(),
                          state=DomainState.from_libvirt(state), cpu_seconds=cpu_time / 1e9,
                          metadata=metadata)

    # -- the network -------------------------------------------------------------------------

    def ensure_network(self, spec: NetworkSpec) -> str:
        """Create ``spec``'s network, or repair it, and return its bridge's name. Idempotent.

        An existing network of that name with different XML (or inactive) is destroyed and
        recreated as a transient network, unless domains are attached to it: then it is kept
        as it is, with a warning, until a later call finds it idle.
        """
        conn = self._connection()
        network = self._lookup_network(spec.name)
        if network is not None:
            try:
                existing = NetworkSpec.from_xml(network.XMLDesc(0))
                active = bool(network.isActive())
            except (libvirt.libvirtError, ET.ParseError, ValueError) as error:
                raise HypervisorError(f"cannot read network {spec.name}: {error}") from error
            if active and not spec.satisfied_by(existing):
                users = self._domains_on_network(spec.name)
                if users:
                    log.warning("network %s differs from the configuration but %d domains use "
                                "it (%s); keeping it until they are gone", spec.name, len(users),
                                ", ".join(sorted(users)[:5]))
                else:
                    log.warning("network %s differs from the configuration: recreating it",
                                spec.name)
                    self._remove_network(network)
                    network = None
            elif not active:
                log.info("network %s exists but is inactive: recreating it", spec.name)
                self._remove_network(network)
                network = None
        if network is None:
            try:
                network = conn.networkCreateXML(spec.to_xml())
            except libvirt.libvirtError as error:
                # Commonly another interface already carries the subnet (TESTBED.md P6).
                raise HypervisorError(f"cannot create network {spec.name}: {error}",
                                      _error_code(error)) from error
        try:
            bridge = network.bridgeName()
        except libvirt.libvirtError as error:
            raise HypervisorError(f"network {spec.name} has no bridge: {error}",
                                  _error_code(error)) from error
        for address in spec.bridge_addresses:
            try:
                self.command_runner(["ip", "address", "replace", address, "dev", bridge])
            except CommandError as error:
                # A HypervisorError like every other failure here: vacd retries the connection.
                raise HypervisorError(f"cannot give bridge {bridge} the address {address}: {error}") from error
        return bridge

    def remove_network(self, name: str) -> None:
        """Destroy (and undefine, if persistent) the network ``name``. Success if absent."""
        network = self._lookup_network(name)
        if network is not None:
            self._remove_network(network)

    def _lookup_network(self, name: str) -> Optional[libvirt.virNetwork]:
        try:
            return self._connection().networkLookupByName(name)
        except libvirt.libvirtError as error:
            if _error_code(error) == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise HypervisorError(f"cannot look up network {name}: {error}",
                                  _error_code(error)) from error

    @staticmethod
    def _remove_network(network: libvirt.virNetwork) -> None:
        try:
            if network.isActive():
                network.destroy()
            if network.isPersistent():
                network.undefine()
        except libvirt.libvirtError as error:
            if _error_code(error) != libvirt.VIR_ERR_NO_NETWORK:
                raise HypervisorError(f"cannot remove network: {error}",
                                      _error_code(error)) from error

    def _domains_on_network(self, name: str) -> list[str]:
        """Names of active domains with an interface on the network ``name``."""
        users = []
        for domain in self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                root = ET.fromstring(domain.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # gone meanwhile
            if any(source.get("network") == name
                   for source in root.findall("devices/interface/source")):
                users.append(domain.name())
        return users

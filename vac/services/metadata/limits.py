"""The metadata and MJF services' resource limits, and how they are sized for a host."""

from __future__ import annotations

import dataclasses
import logging

from vac.services.fairness import connection_share, shares_fit_in

# Room beside one largest joboutput in a machine's upload share: heartbeats and messages are tiny.
SMALL_UPLOADS_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of the two services."""

    joboutput_file_bytes: int = 1024 * 1024
    joboutputs_total_bytes: int = 10 * 1024 * 1024  # per machine, all files together
    joboutputs_max_files: int = 100  # per machine
    # Open connections per machine to both services together; start_services lowers it so that
    # every slot's share fits in the descriptor limit (fair_limits).
    connections_per_machine: int = 16
    body_timeout_seconds: float = 30.0  # whole body of one PUT
    idle_timeout_seconds: float = 15.0  # connection without a complete request (slowloris)
    log_burst: int = 30  # request log lines per source before rate limiting starts
    log_per_second: float = 1.0


DEFAULT_LIMITS = Limits()


def upload_share_bytes(limits: Limits) -> int:
    """Bytes of upload bodies one machine may have in flight: a file of the largest size
    allowed and room for small ones beside it. Bodies are held in memory until written, so all
    machines together hold at most the slot count times this."""
    return limits.joboutput_file_bytes + SMALL_UPLOADS_BYTES


def fair_limits(limits: Limits, slots: int, descriptors: int) -> Limits:
    """``limits`` with ``connections_per_machine`` lowered, if need be, so that ``slots``
    machines and the share of all unattributed addresses fit in ``descriptors`` (the open file
    limit) beside vacd's reserve. Each share is at least one connection: if even that does not
    fit, ``shares_fit`` says so and ``sized_limits`` warns."""
    share = connection_share(limits.connections_per_machine, slots, descriptors)
    return dataclasses.replace(limits, connections_per_machine=share)


def shares_fit(limits: Limits, slots: int, descriptors: int) -> bool:
    """Whether every share of ``limits`` and vacd's reserve fit in ``descriptors``."""
    return shares_fit_in(limits.connections_per_machine, slots, descriptors)


def sized_limits(limits: Limits, machines: int, descriptors: int, logger: logging.Logger,
                 unit: str = "slots") -> Limits:
    """``fair_limits`` for ``machines`` (counted in ``unit``, for the log), with a warning on
    ``logger`` if even one connection each does not fit."""
    limits = fair_limits(limits, machines, descriptors)
    if not shares_fit(limits, machines, descriptors):
        logger.warning("an open file limit of %d is too low for %d %s: machines may run the "
                       "services out of descriptors (raise LimitNOFILE)", descriptors, machines, unit)
    return limits

"""The metadata service (169.254.169.254) and the Machine/Job Features service (169.254.169.253).

Both are aiohttp servers on vacd's event loop. A request is attributed to a machine by its TCP
source address only (``slot_for_address``, by default the slot plan's ``model.slot_for_ip``,
then the daemon's ``resolve(slot)``); headers such as ``X-Forwarded-For`` are never read
(STANDARDS.md §E3, OSSN-0074). Anything that cannot be attributed gets 404 (GET) or 403 (writes).

The package, one concern a module (every public name is also importable from here):

* ``base``: attribution, request paths (``path_segments``), reading a machine's files,
  responses and the rate-limited request log shared by both services;
* ``ec2_openstack``: the metadata service's EC2 and OpenStack paths, as cloud-init reads them;
* ``mjf``: the MJF service's GET paths; ``joboutputs``: its uploads (PUT/POST);
* ``files``: the MJF files themselves (``mjf_features``, ``write_mjf``,
  ``lower_deadline_files``; REFERENCE.md §4.1);
* ``limits``: the services' limits and their sizing for a host; ``server``: ``start_services``.

Fairness: no machine can cost another a request. Connections are accepted by
vac.services.fairness: a machine holds at most ``connections_per_machine`` connections to the
two services together (every address outside the slot plan shares one such share), sized at
start so that every slot's share fits in the descriptor limit (``fair_limits``). Uploads being
received are capped per machine (``upload_share_bytes``), so one machine's uploads never delay
another's.
"""

from vac.services.fairness import (
    ConnectionShares,
    LogLimiter,
    SlotForAddress,
    reserved_descriptors,
)
from vac.services.metadata.base import (
    CLIENT_GONE,
    MAX_DOCUMENT_BYTES,
    BadPath,
    MachineContext,
    Resolver,
    path_segments,
    read_document,
)
from vac.services.metadata.ec2_openstack import (
    EC2_KEY_NAME,
    OPENSTACK_VERSIONS,
    VERSION,
    MetadataService,
    ec2_meta_data,
    metadata_app,
    network_data,
    openstack_meta_data,
)
from vac.services.metadata.files import (
    MJF_DIRECTORIES,
    MJF_KEY,
    lower_deadline_files,
    mjf_features,
    write_mjf,
)
from vac.services.metadata.joboutputs import JOBOUTPUT_NAME, joboutputs_usage
from vac.services.metadata.limits import (
    DEFAULT_LIMITS,
    SMALL_UPLOADS_BYTES,
    Limits,
    fair_limits,
    shares_fit,
    sized_limits,
    upload_share_bytes,
)
from vac.services.metadata.mjf import MjfService, mjf_app
from vac.services.metadata.server import Services, start_services

__all__ = [
    "CLIENT_GONE", "DEFAULT_LIMITS", "EC2_KEY_NAME", "JOBOUTPUT_NAME", "MAX_DOCUMENT_BYTES",
    "MJF_DIRECTORIES", "MJF_KEY", "OPENSTACK_VERSIONS", "SMALL_UPLOADS_BYTES", "VERSION", "BadPath",
    "ConnectionShares", "Limits", "LogLimiter", "MachineContext", "MetadataService", "MjfService",
    "Resolver", "Services", "SlotForAddress", "ec2_meta_data", "fair_limits",
    "joboutputs_usage", "lower_deadline_files", "metadata_app", "mjf_app", "mjf_features",
    "network_data", "openstack_meta_data", "path_segments", "read_document",
    "reserved_descriptors", "shares_fit", "sized_limits", "start_services", "upload_share_bytes", "write_mjf",
]

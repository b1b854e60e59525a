"""VacQuery 01.03: the UDP protocol factories of a space use to tell each other what they run.

Wire format and classic behaviour: REFERENCE.md §2; hardening: STANDARDS.md §E4. One concern
per module:

* ``records``: the typed status records (a slot, a machinetype, a factory; a daemon's snapshot);
* ``codec``: queries and the three status messages, byte-compatible with classic peers, and
  the strict decoder for everything received;
* ``auth``: the optional shared secret (an ``hmac`` key classic peers ignore);
* ``net``: socket buffers, name resolution, factory entries, counting dropped datagrams;
* ``responder``: the endpoint inside vacd answering from the daemon's in-memory status;
* ``client``: queries of many factories with one deadline, and the planner's peer-report cache;
* ``vacmon``: the datagrams sent to VacMon collectors.

The tables and ssh command lines of the ``vac`` command are in vac.cli.tables and vac.cli.ssh.
Importers use the names below; the modules' other names are internal.
"""

from vac.services.vacquery.auth import Authenticator, SecretError, load_secret, reload_secret
from vac.services.vacquery.client import (
    PeerReportCache,
    QueryResult,
    query,
    query_factories,
    query_machines,
    query_machinetypes,
)
from vac.services.vacquery.codec import (
    AMPLIFICATION_FACTOR,
    COMMAND_CLIENT,
    FACTORY,
    FACTORY_CLIENT,
    MACHINES,
    MACHINETYPES,
    MAX_ITEMS,
    MAX_RECEIVE_BYTES,
    MAX_SEND_BYTES,
    QUERY_TYPES,
    RESPONDER_CLIENT,
    SCHEMAS,
    VACQUERY_VERSION,
    DatagramError,
    Query,
    Response,
    encode_factory_status,
    encode_machine_status,
    encode_machinetype_status,
    encode_query,
    make_cookie,
    new_salt,
    parse_query,
    parse_response,
    site_name,
)
from vac.services.vacquery.net import factory_address, raise_buffers
from vac.services.vacquery.records import (
    FactoryStatus,
    MachineStatus,
    StatusRecord,
    StatusSnapshot,
)
from vac.services.vacquery.responder import Responder, start_responder
from vac.services.vacquery.vacmon import (
    parse_hostport,
    send_vacmon,
    vacmon_cycle_messages,
    vacmon_finish_message,
)

__all__ = [
    "AMPLIFICATION_FACTOR", "COMMAND_CLIENT", "FACTORY", "FACTORY_CLIENT", "MACHINES",
    "MACHINETYPES", "MAX_ITEMS", "MAX_RECEIVE_BYTES", "MAX_SEND_BYTES", "QUERY_TYPES",
    "RESPONDER_CLIENT", "SCHEMAS", "VACQUERY_VERSION", "Authenticator", "DatagramError",
    "FactoryStatus", "MachineStatus", "PeerReportCache", "Query", "QueryResult", "Responder",
    "Response", "SecretError", "StatusRecord", "StatusSnapshot", "encode_factory_status",
    "encode_machine_status", "encode_machinetype_status", "encode_query", "factory_address",
    "load_secret", "make_cookie", "new_salt", "parse_hostport", "parse_query", "parse_response",
    "query", "query_factories", "query_machines", "query_machinetypes", "raise_buffers",
    "reload_secret", "send_vacmon", "site_name", "start_responder", "vacmon_cycle_messages",
    "vacmon_finish_message",
]

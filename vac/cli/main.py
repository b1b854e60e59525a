"""The ``vac`` command: status of the whole space, configuration, accounting and tools.

Each subcommand is a ``cmd_<name>(args) -> int`` function registered in ``build_parser``.
Output goes to stdout (tables, or JSON with ``--json``); problems to stderr; the exit status is
the function's return value.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from vac import __version__
from vac.core.config import DEFAULT_RUN_CONFS
from vac.ops.configcli import add_config_arguments, report_config


def cmd_conf(args: argparse.Namespace) -> int:
    """Print the effective configuration, each value with the file:line that set it.

    With --check print only the problems. Problems go to stderr; exit status 1 on any error.
    """
    from vac.core import config as configmod

    return report_config(configmod.ConfigPaths.from_args(args), args.check)


def register_config_commands(commands: argparse._SubParsersAction) -> None:
    conf = commands.add_parser("conf", help="show the effective configuration and where each value was set")
    conf.add_argument("--check", action="store_true", help="print only problems; exit status 1 on any error")
    conf.set_defaults(func=cmd_conf)


def cmd_proxy_init(args: argparse.Namespace) -> int:
    """Print a 12-hour limited proxy of CERT/KEY (RFC 3820, or legacy Globus with -l)."""
    # Imported here so that the other subcommands do not load the crypto libraries.
    import time

    from vac.content import x509

    try:
        with open(args.cert, "rb") as cert_file, open(args.key, "rb") as key_file:
            cert_pem, key_pem = cert_file.read(), key_file.read()
        now = time.time()
        proxy = x509.make_proxy(
            cert_pem, key_pem, expires=now + x509.CLI_PROXY_SECONDS, now=now, legacy=args.legacy_proxy
        )
    except OSError as error:
        print(f"vac proxy-init: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    except x509.ProxyError as error:
        print(f"vac proxy-init: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(proxy)
    return 0


def cmd_cernvm_signature(args: argparse.Namespace) -> int:
    """Print the CernVM signature check of IMAGE; exit 0 only if it verifies."""
    import json

    from vac.content import x509

    result = x509.read_cernvm_signature(args.image, args.ca_dir or x509.DEFAULT_CA_DIR)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        for key in ("verified", "dn", "version", "reason"):
            value = getattr(result, key)
            if value is not None:
                print(f"{key}: {value}")
    return 0 if result.verified else 1


def register_x509_commands(commands: argparse._SubParsersAction) -> None:
    proxy_init = commands.add_parser("proxy-init", help="print a 12-hour limited X.509 proxy")
    proxy_init.add_argument("-c", "--cert", required=True, help="PEM certificate (chain)")
    proxy_init.add_argument("-k", "--key", required=True, help="unencrypted PEM private key")
    proxy_init.add_argument("-l", "--legacy-proxy", action="store_true", help="legacy Globus proxy instead of RFC 3820")
    proxy_init.set_defaults(func=cmd_proxy_init)

    signature = commands.add_parser("cernvm-signature", help="check the signature of a CernVM image")
    signature.add_argument("image", help="image file")
    signature.add_argument("--ca-dir", help="hashed CA directory (default /etc/grid-security/certificates)")
    signature.add_argument("-J", "--json", action="store_true", help="print JSON")
    signature.set_defaults(func=cmd_cernvm_signature)


def cmd_drain(args: argparse.Namespace) -> int:
    """Stop creating machines (optionally with a deadline for the running ones) via the run-time file."""
    import time

    from vac.cli import operator as ops

    path = args.run_conf or DEFAULT_RUN_CONFS[0]
    try:
        until = ops.parse_time(args.until, time.time()) if args.until else None
        ops.set_draining(path, until)
    except ops.OpsError as error:
        print(f"vac drain: {error}", file=sys.stderr)
        return 1
    print(f"Draining: no new machines will be created ({path}).")
    if until is not None:
        print(f"Running machines must finish by {ops.describe_time(until)} (shutdown_time = {until}).")
    print("vacd applies this at its next cycle, or at once after 'systemctl reload vacd'.")
    return 0


def cmd_undrain(args: argparse.Namespace) -> int:
    """Remove draining and shutdown_time from the run-time file(s)."""
    from vac.cli import operator as ops

    paths = [args.run_conf] if args.run_conf else ops.unique_paths(DEFAULT_RUN_CONFS)
    try:
        changed = [path for path in paths if ops.clear_draining(path)]
    except ops.OpsError as error:
        print(f"vac undrain: {error}", file=sys.stderr)
        return 1
    if changed:
        print(f"No longer draining ({', '.join(changed)}); vacd applies this at its next cycle.")
    else:
        print(f"Not drained by a run-time file ({', '.join(paths)}); nothing to do.")
    return 0


def cmd_squid_conf(args: argparse.Namespace) -> int:
    """Write OUT from the template IN plus the space's factories; only if it changes.

    Exit status: 0 written or unchanged, 1 template, configuration or factory address unusable
    (OUT left alone), 2 OUT cannot be written.
    """
    from vac.cli import operator as ops
    from vac.core import config as configmod

    try:
        with open(args.template, encoding="utf-8") as template_file:
            template = template_file.read()
    except (OSError, UnicodeDecodeError) as error:
        print(f"vac squid-conf: cannot read {args.template}: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 1
    config, problems = configmod.load_config(configmod.ConfigPaths.from_args(args))
    if config is None:
        for problem in problems:
            print(f"vac squid-conf: {problem}", file=sys.stderr)
        return 1
    try:
        factories = [(factory.name, ops.resolve_factory(factory)) for factory in config.settings.factories]
    except ops.OpsError as error:
        print(f"vac squid-conf: {error}; {args.output} left unchanged", file=sys.stderr)
        return 1
    try:
        ops.write_if_changed(args.output, ops.squid_conf(template, factories, config.settings.factory_name))
    except OSError as error:
        print(f"vac squid-conf: cannot write {args.output}: {error.strerror}", file=sys.stderr)
        return 2
    return 0


def register_ops_commands(commands: argparse._SubParsersAction) -> None:
    drain = commands.add_parser("drain", help="stop creating machines on this factory (run-time setting)")
    drain.add_argument("--until", metavar="TIME",
                       help="also make running machines finish by TIME (Unix seconds, +N[smhd] or ISO 8601)")
    drain.set_defaults(func=cmd_drain)

    undrain = commands.add_parser("undrain", help="undo vac drain")
    undrain.set_defaults(func=cmd_undrain)

    squid = commands.add_parser("squid-conf", help="write a Squid configuration for this space's factories")
    squid.add_argument("template", help="template, e.g. /etc/squid/squid.conf.vac")
    squid.add_argument("output", help="configuration to write, e.g. /etc/squid/squid.conf")
    squid.set_defaults(func=cmd_squid_conf)


def cmd_apel_sync(args: argparse.Namespace) -> int:
    """Write an APEL sync record for each month YYYYMM (default: the month of now - 24 h)."""
    from vac.core import config as configmod
    from vac.records import apel

    config, problems = configmod.load_config(configmod.ConfigPaths.from_args(args))
    if config is None:
        for problem in problems:
            print(f"vac apel-sync: {problem}", file=sys.stderr)
        return 1
    try:
        results = apel.sync_records(config.settings, args.months)
    except (ValueError, apel.ApelError) as error:
        print(f"vac apel-sync: {error}", file=sys.stderr)
        return 1
    for result in results:
        for count in result.counts:
            print(f"{result.year:04d}-{result.month:02d} Site {count.site} SubmitHost "
                  f"{count.submit_host}: {count.number_of_jobs} jobs")
        print(f"written to {result.path}")
    return 0


def register_apel_commands(commands: argparse._SubParsersAction) -> None:
    sync = commands.add_parser("apel-sync", help="write APEL sync records for ssmsend")
    sync.add_argument("months", nargs="*", metavar="YYYYMM", help="months (default: the month of now - 24 h)")
    sync.set_defaults(func=cmd_apel_sync)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the planner over the simulated space of SCENARIO; print a summary or JSON; plot."""
    from vac.cli import simulate

    try:
        if args.plot:
            simulate.check_plot_support()  # before minutes of simulation, not after
        scenario = simulate.load_scenario(args.scenario)
        if args.duration is not None:
            scenario = scenario.replace(duration=simulate.parse_duration(args.duration))
        if args.seed is not None:
            scenario = scenario.replace(seed=args.seed)
    except (simulate.ScenarioError, simulate.PlotError, ValueError) as error:
        print(f"vac simulate: {error}", file=sys.stderr)
        return 1
    if scenario.duration <= 0:
        print("vac simulate: --duration must be greater than 0", file=sys.stderr)
        return 1
    result = simulate.simulate(scenario)
    if args.json:
        print(simulate.format_json(result))
    else:
        print(simulate.format_summary(result), end="")
    if args.plot:
        try:
            simulate.plot(result, args.plot)
        except simulate.PlotError as error:
            print(f"vac simulate: {error}", file=sys.stderr)
            return 1
    return 0


def register_simulate_commands(commands: argparse._SubParsersAction) -> None:
    simulate = commands.add_parser("simulate", help="run the real planner over a simulated space")
    simulate.add_argument("scenario", help="scenario file (see etc/simulate/ and vac(1))")
    simulate.add_argument("-J", "--json", action="store_true", help="print JSON instead of the summary")
    simulate.add_argument("--plot", metavar="PNG", help="also draw processors per machinetype over time (needs matplotlib)")
    simulate.add_argument("--duration", metavar="D", help="simulated time instead of the scenario's (e.g. 6h)")
    simulate.add_argument("--seed", type=int, help="random seed instead of the scenario's")
    simulate.set_defaults(func=cmd_simulate)


def _vacquery(args: argparse.Namespace, kind: str):
    """Load the configuration and run one VacQuery query for ``vac COMMAND``.

    Returns (settings, result), or None after printing why not.
    """
    import asyncio

    from vac.core import config as configmod
    from vac.services import vacquery

    command = args.command
    config, problems = configmod.load_config(configmod.ConfigPaths.from_args(args))
    if config is None:
        for problem in problems:
            if problem.is_error:
                print(f"vac {command}: {problem}", file=sys.stderr)
        return None
    settings = config.settings
    if args.timeout is not None and not 0 < args.timeout <= 3600:
        print(f"vac {command}: --timeout must be between 0 and 3600 seconds", file=sys.stderr)
        return None
    try:
        secret = vacquery.load_secret(settings)
    except vacquery.SecretError as error:
        secret = None  # usual without root: the secret file is root's
        if not settings.vacquery_allow_unauthenticated:
            print(f"vac {command}: {error}; factories that require authentication will not answer",
                  file=sys.stderr)
    factories = getattr(args, "factories", None) or None
    result = asyncio.run(vacquery.query(settings, kind, factories, args.timeout, space=args.space,
                                        client=vacquery.COMMAND_CLIENT, secret=secret))
    return settings, result


def _print_status(args: argparse.Namespace, result, table: str) -> int:
    """The table (or with --json the raw messages, problems on stderr); 1 unless all answered."""
    import json

    from vac.cli.tables import problem_lines

    if args.json:
        print(json.dumps(result.messages, indent=2))
        for line in problem_lines(result):
            print(f"vac {args.command}: {line}", file=sys.stderr)
    else:
        sys.stdout.write(table)
    return 0 if result.complete else 1


def cmd_machines(args: argparse.Namespace) -> int:
    """One line per slot of every factory (or of the factories named)."""
    import time

    from vac.cli import tables
    from vac.services import vacquery

    done = _vacquery(args, vacquery.MACHINES)
    if done is None:
        return 1
    return _print_status(args, done[1], tables.render_machines(done[1], time.time()))


def cmd_machinetypes(args: argparse.Namespace) -> int:
    """Per factory and machinetype: machines, processors, HS06, last shutdown; then totals."""
    import time

    from vac.cli import tables
    from vac.services import vacquery

    done = _vacquery(args, vacquery.MACHINETYPES)
    if done is None:
        return 1
    result = done[1]
    wanted = getattr(args, "machinetype", None)
    if wanted is not None:
        result.messages = [message for message in result.messages if message.get("machinetype") == wanted]
    return _print_status(args, result, tables.render_machinetypes(result, time.time(), wanted))


def cmd_factories(args: argparse.Namespace) -> int:
    """One line per factory: processors, machines, HS06, load, disk, memory, version."""
    import time

    from vac.cli import tables
    from vac.services import vacquery

    done = _vacquery(args, vacquery.FACTORY)
    if done is None:
        return 1
    return _print_status(args, done[1], tables.render_factories(done[1], time.time()))


def cmd_ssh(args: argparse.Namespace) -> int:
    """Find MACHINE in the space and replace this process with ssh to it as root."""
    import os

    from vac.cli import ssh, tables
    from vac.services import vacquery

    done = _vacquery(args, vacquery.MACHINES)
    if done is None:
        return 1
    settings, result = done
    found = ssh.find_machine(result.reports, args.machine)
    live = [machine for machine in found if machine.state in tables.LIVE_STATES]
    if len(live) != 1:
        if len(live) > 1:
            why = "is ambiguous: " + ", ".join(f"{m.machine} on {m.factory}" for m in live)
        elif found:
            why = "is not running: " + ", ".join(f"{m.machine} on {m.factory} is {m.state}" for m in found)
        else:
            why = "was not found"
        print(f"vac ssh: {args.machine} {why}", file=sys.stderr)
        for line in tables.problem_lines(result):
            print(f"vac ssh: {line}", file=sys.stderr)
        return 1
    try:
        argv = ssh.ssh_argv(live[0], settings, args.remote_command)
        sys.stdout.flush()
        os.execvp(argv[0], argv)
    except (ValueError, OSError) as error:
        print(f"vac ssh: {error}", file=sys.stderr)
    return 1


def _add_query_options(parser: argparse.ArgumentParser, listing: bool = True) -> None:
    parser.add_argument("-s", "--space", help="ask about this space instead of vac_space")
    parser.add_argument("-t", "--timeout", type=float, metavar="SECONDS",
                        help="give up waiting after this long (default udp_timeout_seconds)")
    if listing:
        parser.add_argument("-J", "--json", action="store_true", help="print the raw VacQuery messages as JSON")
        parser.add_argument("factories", nargs="*", metavar="FACTORY",
                            help="ask only these factories (. is this one; default: all of the space)")


def register_vacquery_commands(commands: argparse._SubParsersAction) -> None:
    machines = commands.add_parser("machines", help="list the machines of the space")
    _add_query_options(machines)
    machines.set_defaults(func=cmd_machines)
    machinetypes = commands.add_parser("machinetypes", help="machines per machinetype and factory, last shutdowns")
    _add_query_options(machinetypes)
    machinetypes.set_defaults(func=cmd_machinetypes, machinetype=None)
    machinetype = commands.add_parser("machinetype", help="vac machinetypes for one machinetype")
    machinetype.add_argument("machinetype", metavar="NAME", help="the machinetype to show")
    _add_query_options(machinetype)
    machinetype.set_defaults(func=cmd_machinetypes)
    factories = commands.add_parser("factories", help="list the factories of the space")
    _add_query_options(factories)
    factories.set_defaults(func=cmd_factories)
    ssh = commands.add_parser("ssh", help="ssh to a machine as root, wherever in the space it runs")
    _add_query_options(ssh, listing=False)
    ssh.add_argument("machine", metavar="MACHINE", help="machine name, short name or UUID")
    ssh.add_argument("remote_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                     help="command to run instead of a login shell")
    ssh.set_defaults(func=cmd_ssh)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vac", description="Vac VM factory: status, configuration and tools.")
    parser.add_argument("--version", action="version", version=f"vac {__version__}")
    add_config_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    # Subcommands are registered below, one block per area.
    register_config_commands(commands)
    register_x509_commands(commands)
    register_ops_commands(commands)
    register_apel_commands(commands)
    register_simulate_commands(commands)
    register_vacquery_commands(commands)
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

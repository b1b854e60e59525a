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
from vac.config import DEFAULT_CONF_DIR, DEFAULT_MAIN_CONF


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``vac`` and ``vacd`` to read configuration from elsewhere."""
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="fragment directory (default %(default)s)")
    parser.add_argument("--conf", default=DEFAULT_MAIN_CONF, help="main file (default %(default)s)")
    parser.add_argument("--run-conf", default=None, help="run-time file (default /run/vac.conf and /var/run/vac.conf)")


def cmd_proxy_init(args: argparse.Namespace) -> int:
    """Print a 12-hour limited proxy of CERT/KEY (RFC 3820, or legacy Globus with -l)."""
    # Imported here so that the other subcommands do not load the crypto libraries.
    import time

    from vac import x509

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

    from vac import x509

    result = x509.read_cernvm_signature(args.image, args.ca_dir)
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
    signature.add_argument(
        "--ca-dir", default="/etc/grid-security/certificates", help="hashed CA directory (default %(default)s)"
    )
    signature.add_argument("-J", "--json", action="store_true", help="print JSON")
    signature.set_defaults(func=cmd_cernvm_signature)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vac", description="Vac VM factory: status, configuration and tools.")
    parser.add_argument("--version", action="version", version=f"vac {__version__}")
    add_config_arguments(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    # Subcommands are registered below, one block per area.
    register_x509_commands(commands)
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

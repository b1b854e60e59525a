"""Cost of re-reading the configuration, which vacd does every cycle (and the classic responder
did for every query).

Loads the example fragments in ``etc/vac.d`` (settings + two machinetypes), and a generated space
of 20 machinetypes, with ``vac.core.config.load_config``; the baseline is the bare stdlib
``configparser`` reading the same files without any checking, as the classic factory did.
Run: ``python benchmarks/config_reload.py [--rounds 500]``.
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vac.core.config import ConfigPaths, load_config  # noqa: E402

HOST = {"hostname": "wn001.example.org", "processor_count": 64}


def per_call_ms(function: Callable[[], object], rounds: int) -> float:
    function()
    start = time.perf_counter()
    for _ in range(rounds):
        function()
    return (time.perf_counter() - start) * 1000 / rounds


def baseline(files: list[str]) -> Callable[[], object]:
    def read() -> object:
        parser = configparser.RawConfigParser(strict=False)
        parser.read(files)
        return parser

    return read


def write_large_space(directory: str, machinetypes: int) -> None:
    with open(os.path.join(directory, "10-settings.conf"), "w") as stream:
        stream.write("[settings]\nvac_space = vac01.example.org\nfactories = "
                     + " ".join(f"wn{n:03d}" for n in range(100)) + "\n")
    for n in range(machinetypes):
        with open(os.path.join(directory, f"20-type{n:02d}.conf"), "w") as stream:
            stream.write(f"[machinetype type{n:02d}]\ntarget_share = {n + 1}\nroot_image = type{n}.iso\n"
                         f"user_data = https://vo{n}.example.org/user_data\nmax_processors = 8\n"
                         "heartbeat_file = heartbeat\nheartbeat_seconds = 600\n"
                         f"accounting_fqan = /vo{n}/Role=pilot\nuser_data_option_queue = q{n}\n")


def measure(label: str, conf_dir: str, rounds: int) -> None:
    paths = ConfigPaths(conf_dir, os.path.join(conf_dir, "absent.conf"), ())
    config, problems = load_config(paths, **HOST)
    assert config is not None, [str(problem) for problem in problems]
    files = sorted(os.path.join(conf_dir, name) for name in os.listdir(conf_dir) if name.endswith(".conf"))
    ours = per_call_ms(lambda: load_config(paths, **HOST), rounds)
    classic = per_call_ms(baseline(files), rounds)
    print(f"{label}: load_config {ours:.3f} ms, bare configparser {classic:.3f} ms, "
          f"ratio {ours / classic:.2f}x ({len(config.machinetypes)} machinetypes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    measure("etc/vac.d example", os.path.join(here, "..", "etc", "vac.d"), args.rounds)
    with tempfile.TemporaryDirectory() as directory:
        write_large_space(directory, 20)
        measure("20 machinetypes, 100 factories", directory, args.rounds)


if __name__ == "__main__":
    main()

"""Fairness of the metadata/MJF services: other machines while one machine floods (issue 17).

Targets: ARCHITECTURE.md §8, "another machine's metadata GET while one machine floods the
services: p99 < 50 ms"; issue 17: every heartbeat of the other machines accepted, the flood
adds fewer than 100 lines to the log (the lines naming the other machines, which grow with
``--machines`` and ``--seconds``, aside), and no 500 in 10,000 parallel uploads from one machine.

The services run as vacd starts them (``start_services`` with the default limits) in their own
process, whose open file limit is lowered first to systemd's default soft limit (1,024, as on a
host without vacd's unit; ``--nofile``). Processes, over loopback (client N bound to
127.0.0.(10+N) is the machine in slot N):

* the flood, machine 1: ``--flood-tasks`` connections at once, alternately to both services,
  each sending keep-alive GETs back to back; a connection that is reset (over the machine's
  share) is opened again at once;
* the others, machines 2..``--machines``: paced user_data GETs, a new connection each (as
  cloud-init), latency from the scheduled send time, and one heartbeat PUT per machine and
  second.

Each measurement is taken without the flood first (the baseline), beside a process that only
burns a core (the flooding client does, and on a small shared host that alone moves the p99),
then with the flood. Then machine 1 sends ``--uploads`` PUTs over as many connections at once
as its share allows, to 20 names, and the statuses are counted.

Run: ``python benchmarks/metadata_flood.py [--seconds 5] [--nofile 1024] [--uploads 10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.metadata import (  # noqa: E402
    METADATA_HOST,
    MJF_HOST,
    SETTINGS,
    _cpu_seconds,
    _one,
    loopback_slot,
    make_state,
)
from vac.services import metadata  # noqa: E402

TARGET_P99_MS = 50.0
LABELS = {"baseline": "without a flood (baseline)",
          "spin": "beside a process burning a core",
          "flood": "while machine 1 floods"}
USER_DATA = "/openstack/latest/user_data"
FLOOD_PATH = "/openstack/latest/meta_data.json"


def run_services(root: str, machines: int, nofile: int, share: int, ready) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    logging.basicConfig(filename=os.path.join(root, "vacd.log"), level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    contexts = make_state(Path(root), machines)

    async def main() -> None:
        services = await metadata.start_services(
            SETTINGS, contexts.get, metadata_address=METADATA_HOST, mjf_address=MJF_HOST,
            port=0, slot_for_address=loopback_slot, slots=machines,
            limits=dataclasses.replace(metadata.DEFAULT_LIMITS, connections_per_machine=share))
        ready.send((services.metadata_url, services.mjf_url,
                    services.limits.connections_per_machine))
        await asyncio.Event().wait()  # until terminated

    asyncio.run(main())


def _split(base: str) -> tuple[str, int]:
    host, port = base.split("//")[1].split(":")
    return host, int(port)


# --- machine 1: the flood --------------------------------------------------------------------


async def _flood_task(base: str, stop_at: float, counts: dict) -> None:
    host, port = _split(base)
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, port,
                                                           local_addr=("127.0.0.11", 0))
        except OSError:
            counts["refused"] += 1
            continue
        try:
            while loop.time() < stop_at:
                await _one(reader, writer, host, FLOOD_PATH, True)
                counts["served"] += 1
        except (OSError, asyncio.IncompleteReadError):
            counts["refused"] += 1
        finally:
            writer.close()


def run_spin(seconds: float) -> None:
    """The control: a process that only burns a core, as the flooding client does."""
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        pass


def run_flood(urls: tuple, tasks: int, seconds: float, result) -> None:
    counts = {"served": 0, "refused": 0}

    async def main() -> None:
        stop_at = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(_flood_task(urls[number % 2], stop_at, counts)
                               for number in range(tasks)))

    asyncio.run(main())
    result.send(counts)


# --- the other machines ----------------------------------------------------------------------


async def _get(base: str, slot: int) -> bool:
    host, port = _split(base)
    reader, writer = await asyncio.open_connection(host, port,
                                                   local_addr=(f"127.0.0.{10 + slot}", 0))
    try:
        return await _one(reader, writer, host, USER_DATA, False)
    finally:
        writer.close()


async def _heartbeat(base: str, slot: int, number: int) -> bool:
    host, port = _split(base)
    reader, writer = await asyncio.open_connection(host, port,
                                                   local_addr=(f"127.0.0.{10 + slot}", 0))
    body = str(number).encode()
    try:
        writer.write(f"PUT /joboutputs/heartbeat HTTP/1.1\r\nHost: {host}\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        return head.startswith(b"HTTP/1.1 201")
    finally:
        writer.close()


async def _machine(slot: int, urls: tuple, seconds: float, rate: float, latencies: list,
                   outcome: dict) -> None:
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    interval = 1.0 / rate
    scheduled = loop.time() + interval * slot / 10
    next_heartbeat = loop.time() + 0.5
    number = 0
    while scheduled < stop_at:
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        try:
            ok = await asyncio.wait_for(_get(urls[0], slot), 10)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            ok = False
        latencies.append(loop.time() - scheduled)
        outcome["get errors"] += not ok
        if loop.time() >= next_heartbeat:
            number += 1
            try:
                accepted = await asyncio.wait_for(_heartbeat(urls[1], slot, number), 10)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                accepted = False
            outcome["heartbeats"] += 1
            outcome["heartbeats refused"] += not accepted
            next_heartbeat += 1.0
        scheduled += interval


def measure_others(urls: tuple, machines: int, seconds: float, rate: float) -> tuple:
    latencies: list = []
    outcome = {"get errors": 0, "heartbeats": 0, "heartbeats refused": 0}

    async def main() -> None:
        await asyncio.gather(*(_machine(slot, urls, seconds, rate, latencies, outcome)
                               for slot in range(2, machines + 1)))

    asyncio.run(main())
    return latencies, outcome


# --- uploads from one machine ----------------------------------------------------------------


async def _uploader(base: str, count: int, number: int, statuses: dict) -> None:
    host, port = _split(base)
    streams = None
    for turn in range(count):
        body = f"{number}-{turn}\n".encode() * (1 + turn % 50)
        try:
            if streams is None:
                streams = await asyncio.open_connection(host, port,
                                                        local_addr=("127.0.0.11", 0))
            reader, writer = streams
            writer.write(f"PUT /joboutputs/out{(number + turn) % 20} HTTP/1.1\r\nHost: {host}"
                         f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if b"connection: close" in head.lower():
                writer.close()
                streams = None
        except (OSError, asyncio.IncompleteReadError):
            status, streams = 0, None  # 0: the connection failed
        statuses[status] = statuses.get(status, 0) + 1
    if streams is not None:
        streams[1].close()


def measure_uploads(mjf_url: str, uploads: int, connections: int) -> tuple[dict, float]:
    statuses: dict = {}
    each = uploads // connections

    async def main() -> None:
        await asyncio.gather(*(_uploader(mjf_url, each, number, statuses)
                               for number in range(connections)))

    started = time.perf_counter()
    asyncio.run(main())
    return statuses, time.perf_counter() - started


def _report(label: str, latencies: list, outcome: dict, cpu: float) -> None:
    quantiles = statistics.quantiles(latencies, n=100)
    p50, p99 = quantiles[49] * 1000, quantiles[98] * 1000
    met = p99 < TARGET_P99_MS and not outcome["get errors"] and not outcome["heartbeats refused"]
    print(f"{label:<34} {len(latencies):>6} {p50:>7.2f} {p99:>8.2f} {outcome['get errors']:>7} "
          f"{outcome['heartbeats'] - outcome['heartbeats refused']:>4}/"
          f"{outcome['heartbeats']:<4} {cpu:>5.0f}%  {'PASS' if met else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--machines", type=int, default=6, help="slots with a machine (2-50)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="user_data GETs per second of each other machine")
    parser.add_argument("--nofile", type=int, default=1024,
                        help="open file limit of the services' process")
    parser.add_argument("--flood-tasks", type=int, default=300,
                        help="connections machine 1 keeps trying to hold")
    parser.add_argument("--uploads", type=int, default=10000)
    parser.add_argument("--share", type=int,
                        default=metadata.DEFAULT_LIMITS.connections_per_machine,
                        help="connections per machine before sizing to the limit")
    args = parser.parse_args()
    machines = max(2, min(args.machines, 50))
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="vac-bench-flood-") as root:
        pipe, end = context.Pipe()
        server = context.Process(target=run_services, args=(root, machines, args.nofile, args.share,
                                                                end))
        server.start()
        try:
            if not pipe.poll(30):
                raise SystemExit("services did not start")
            metadata_url, mjf_url, share = pipe.recv()
            urls = (metadata_url, mjf_url)
            print(f"services with an open file limit of {args.nofile}: {machines} slots, "
                  f"{share} connections each; machine 1 floods with {args.flood_tasks} "
                  f"keep-alive connections")
            print(f"machines 2-{machines}: {args.rate:g} user_data GETs/s each (new connection), "
                  f"1 heartbeat PUT/s each; target p99 < {TARGET_P99_MS:g} ms, every "
                  f"heartbeat accepted\n")
            print(f"{'other machines':<34} {'GETs':>6} {'p50 ms':>7} {'p99 ms':>8} "
                  f"{'errors':>7} {'heartbeats':>9} {'CPU':>5} (of the services' process)")
            for row in ("baseline", "spin", "flood"):
                spin = None
                if row == "spin":
                    spin = context.Process(target=run_spin, args=(args.seconds + 2,))
                    spin.start()
                    time.sleep(1.0)
                if row == "flood":
                    log_before = len(Path(root, "vacd.log").read_text().splitlines())
                    result, result_end = context.Pipe()
                    flood = context.Process(target=run_flood, args=(
                        urls, args.flood_tasks, args.seconds + 2, result_end))
                    flood.start()
                    time.sleep(1.0)  # let the flood take hold
                cpu_before, started = _cpu_seconds([server.pid]), time.perf_counter()
                latencies, outcome = measure_others(urls, machines, args.seconds, args.rate)
                cpu = (_cpu_seconds([server.pid]) - cpu_before) / (time.perf_counter() - started)
                _report(LABELS[row], latencies, outcome, cpu * 100)
                if spin is not None:
                    spin.join(args.seconds + 30)
            flood.join(args.seconds + 30)
            counts = result.recv() if result.poll(5) else {}
            lines = Path(root, "vacd.log").read_text().splitlines()
            grown = len(lines) - log_before
            # Lines the flood caused: all but the other machines' own request lines.
            others = tuple(f" factory-{slot:02d}.example.org " for slot in range(2, machines + 1))
            flood_lines = sum(not any(name in line for name in others)
                              for line in lines[log_before:])
            resource_lines = sum("out of system resource" in line for line in lines)
            print(f"\nflood: {counts.get('served', 0)} requests served to machine 1, "
                  f"{counts.get('refused', 0)} of its connections refused or reset")
            print(f"log grew by {grown} lines during the flood, {flood_lines} of them not the "
                  f"other machines' requests (target: fewer than 100 of those: "
                  f"{'PASS' if flood_lines < 100 else 'MISS'}); asyncio accept errors logged: "
                  f"{resource_lines}")
            statuses, elapsed = measure_uploads(mjf_url, args.uploads, share)
            total = sum(statuses.values())
            verdict = "PASS" if not statuses.get(500) else "MISS"
            print(f"\n{total} parallel uploads from machine 1 over {share} connections (its "
                  f"share) in {elapsed:.1f} s ({total / elapsed:.0f}/s): statuses "
                  f"{dict(sorted(statuses.items()))} (0 = failed connection; no 500: {verdict})")
        finally:
            server.terminate()
            server.join(10)


if __name__ == "__main__":
    main()

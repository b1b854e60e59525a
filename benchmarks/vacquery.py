"""VacQuery: responder throughput and latency, and `vac machines` across hundreds of factories.

Targets (ARCHITECTURE.md §8): responder >= 5,000 machinetypes queries/s with 20 machinetypes and
p99 < 5 ms; ``vac machines`` across 500 loopback responders < 1 s.

1. **Responder.** One responder (``vac.services.vacquery.start_responder``, 20 machinetypes) in its own
   process on 127.0.0.2; a load generator in another process keeps ``--concurrency`` queries
   outstanding, each with its own cookie, and counts a query done when all 20 replies arrived.
   The per-source rate limit is raised for this run (the generator is one source); it is still
   evaluated for every query. Baseline in the same run: a classic-design responder (one blocking
   socket, a 1024-byte receive buffer, every reply re-encoded with ``json.dumps`` per query; it
   is spared the classic per-query config and file reads, so the ratio flatters it).
2. **`vac machines`.** 500 responders (``--slots`` machines each) in one process on
   127.1.x.y; the client is ``vac.services.vacquery.query_machines`` as ``vac machines`` runs it. Baseline:
   the classic client algorithm of REFERENCE.md §2.4 (rounds of sends to incomplete factories,
   then receive until one 2 s receive timeout, up to 6 rounds). Both also with 5 responders
   stopped: ours returns at its deadline (``-t 2``), classic needs all six 2 s rounds.

Run: ``python benchmarks/vacquery.py [--seconds 3] [--factories 500] [--slots 8]`` (about a
minute; must be allowed to bind 127.0.0.0/8 addresses, which Linux allows everyone).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vac.core.config import FactoryAddress, Settings  # noqa: E402
from vac.core.model import MachinetypeReport  # noqa: E402
from vac.services import vacquery  # noqa: E402

SPACE = "bench.example.org"
RESPONDER_HOST, CLASSIC_HOST, GENERATOR_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.4"
PORT = 19990
MACHINETYPES = 20
TARGET_RATE, TARGET_P99_MS, TARGET_MACHINES_S = 5000.0, 5.0, 1.0
CLASSIC_RECEIVE_TIMEOUT, CLASSIC_ROUNDS = 2.0, 6


def factory_name(n: int) -> str:
    return f"factory{n:03d}.example.org"


def factory_address(n: int) -> str:
    return f"127.1.{n // 200}.{n % 200 + 2}"


def snapshot(name: str, slots: int, machinetypes: int) -> vacquery.StatusSnapshot:
    host, _, domain = name.partition(".")
    now = time.time()
    machines = [vacquery.MachineStatus(
        factory=name, machine=f"{host}-{n:02d}.{domain}", state="Running", machinetype=f"type{n % 5:02d}",
        machine_model="cernvm4", uuid=f"00000000-0000-4000-8000-{n:012d}", created_time=now - 900,
        started_time=now - 800, heartbeat_time=now - 20, processors=1, cpu_seconds=790,
        cpu_percentage=98.5, hs06=10.0, fqan="/lhcb/Role=NULL/Capability=NULL") for n in range(slots)]
    reports = [MachinetypeReport(
        factory=name, machinetype=f"type{n:02d}", running_hs06=10.0 * n, running_machines=n,
        running_processors=n, num_before_fizzle=1, shutdown_message="300 No payload",
        shutdown_time=now - 60, shutdown_machine=f"{host}-01.{domain}",
        fqan="/lhcb/Role=NULL/Capability=NULL", max_wallclock_seconds=172800, max_processors=1)
        for n in range(machinetypes)]
    status = vacquery.FactoryStatus(factory=name, running_processors=slots, running_machines=slots,
                                    max_processors=slots, max_machines=slots)
    return vacquery.StatusSnapshot(machines, reports, status)


# --- 1. responder throughput ---------------------------------------------------------------------


def serve_responder(ready, stop) -> None:
    logging.disable(logging.WARNING)
    settings = Settings(vac_space=SPACE, factory_name="responder.example.org", vacquery_address=RESPONDER_HOST,
                        vacquery_port=PORT,
                        factories=(FactoryAddress("load.example.org", GENERATOR_HOST),))
    status = snapshot(settings.factory_name, 8, MACHINETYPES)

    async def main() -> None:
        responder = await vacquery.start_responder(settings, lambda: status, None, rate=1e9, burst=1e9)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        responder.close()

    asyncio.run(main())


def serve_classic_responder(ready, stop) -> None:
    """The classic design: blocking loop, 1024-byte buffer, json.dumps of every reply per query."""
    status = snapshot("classic.example.org", 8, MACHINETYPES)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((CLASSIC_HOST, PORT))
    sock.settimeout(0.2)
    ready.set()
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(1024)
        except socket.timeout:
            continue
        try:
            query = json.loads(data)
        except ValueError:
            continue
        if "cookie" not in query or query.get("space") != SPACE:
            continue
        for report in status.machinetypes:
            message = {"message_type": "machinetype_status", "vac_version": "Vac 03.01 vacd-responder",
                       "daemon_version": "Vac 03.01 vacd-responder", "vacquery_version": "VacQuery 01.03",
                       "cookie": query["cookie"], "space": SPACE, "factory": "classic.example.org",
                       "time_sent": int(time.time()), "site": "example.org",
                       "num_machinetypes": len(status.machinetypes), "machinetype": report.machinetype,
                       "bytes_per_processor": 2147483648, "running_hs06": report.running_hs06,
                       "running_machines": report.running_machines, "running_cpus": report.running_processors,
                       "running_processors": report.running_processors,
                       "num_before_fizzle": report.num_before_fizzle,
                       "shutdown_message": report.shutdown_message, "shutdown_time": report.shutdown_time,
                       "shutdown_machine": report.shutdown_machine, "fqan": report.fqan,
                       "max_wallclock_seconds": report.max_wallclock_seconds,
                       "max_processors": report.max_processors}
            sock.sendto(json.dumps(message).encode(), addr)
    sock.close()


def generate_load(host: str, seconds: float, concurrency: int) -> dict:
    """Closed loop: ``concurrency`` queries outstanding; latency = send to 20th reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((GENERATOR_HOST, 0))
    vacquery.raise_buffers(sock)
    sock.settimeout(0.5)
    salt = base64.b64encode(os.urandom(32)).decode()
    counter = 0
    outstanding: dict = {}  # cookie -> [sent time, replies]
    latencies = []
    lost = 0

    def send() -> None:
        nonlocal counter
        counter += 1
        cookie = hashlib.sha256(f"{salt}{counter}".encode()).hexdigest()
        outstanding[cookie] = [time.perf_counter(), 0]
        sock.sendto(vacquery.encode_query(vacquery.MACHINETYPES, SPACE, cookie), (host, PORT))

    started = time.perf_counter()
    end = started + seconds
    for _ in range(concurrency):
        send()
    while time.perf_counter() < end:
        try:
            data = sock.recv(4096)
        except socket.timeout:
            data = b""
        if data:
            at = data.find(b'"cookie":') + 9
            at = data.find(b'"', at) + 1
            entry = outstanding.get(data[at:at + 64].decode("ascii", "replace"))
            if entry is not None:
                entry[1] += 1
                if entry[1] == MACHINETYPES:
                    latencies.append(time.perf_counter() - entry[0])
                    del outstanding[data[at:at + 64].decode()]
                    send()
        now = time.perf_counter()
        if not data or len(latencies) % 1000 == 0:
            for cookie, entry in list(outstanding.items()):
                if now - entry[0] > 1.0:
                    del outstanding[cookie]
                    lost += 1
                    send()
    elapsed = time.perf_counter() - started
    sock.close()
    latencies.sort()
    return {"rate": len(latencies) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)], "done": len(latencies), "lost": lost}


def run_throughput(context, target, host: str, seconds: float, concurrency: int) -> dict:
    ready, stop = context.Event(), context.Event()
    server = context.Process(target=target, args=(ready, stop), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("responder did not start")
        return generate_load(host, seconds, concurrency)
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()


# --- 2. vac machines across many responders ------------------------------------------------------


def space(count: int) -> tuple:
    return tuple(FactoryAddress(factory_name(n), factory_address(n), PORT) for n in range(count))


def serve_space(count: int, slots: int, ready, stop, silence) -> None:
    logging.disable(logging.WARNING)
    factories = space(count)

    async def main() -> None:
        responders = {}
        for entry in factories[1:]:  # factory 0 is the client's own host
            settings = Settings(vac_space=SPACE, factory_name=entry.name, factories=factories,
                                vacquery_address=entry.address, vacquery_port=PORT)
            status = snapshot(entry.name, slots, 3)
            responders[entry.name] = await vacquery.start_responder(settings, lambda s=status: s, None)
        status = snapshot(factories[0].name, slots, 3)
        settings = Settings(vac_space=SPACE, factory_name=factories[0].name, factories=factories,
                            vacquery_address=factories[0].address, vacquery_port=PORT)
        responders[factories[0].name] = await vacquery.start_responder(settings, lambda: status, None)
        ready.set()
        silenced = False
        while not stop.is_set():
            if silence.is_set() and not silenced:
                for n in range(5):
                    responders.pop(factories[1 + n * (count // 5)].name).close()
                silenced = True
            await asyncio.sleep(0.05)
        for responder in responders.values():
            responder.close()

    asyncio.run(main())


def classic_machines_query(factories: tuple, source: str) -> tuple:
    """REFERENCE.md §2.4: rounds to incomplete factories, receive until a 2 s timeout, 6 rounds;
    presence-only checks. Returns (machines received, factories heard)."""
    salt = base64.b64encode(os.urandom(32)).decode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    vacquery.raise_buffers(sock)
    sock.settimeout(CLASSIC_RECEIVE_TIMEOUT)
    responses: dict = {entry.name: {"num_machines": 1, "machines": {}} for entry in factories}
    required = ("num_machines", "machine", "state", "uuid", "created_time", "started_time", "heartbeat_time",
                "cpu_seconds", "cpu_percentage", "hs06", "machinetype", "shutdown_message", "shutdown_time")
    for _ in range(CLASSIC_ROUNDS):
        sent = False
        for entry in factories:
            reply = responses[entry.name]
            if len(reply["machines"]) < reply["num_machines"]:
                query = {"message_type": "machines_query", "method": "machines",
                         "vac_version": "Vac 03.01 vac-command", "vacquery_version": "VacQuery 01.03",
                         "space": SPACE, "cookie": hashlib.sha256((salt + entry.name).encode()).hexdigest()}
                sock.sendto(json.dumps(query).encode(), (entry.address, PORT))
                sent = True
        if not sent:
            break
        while True:
            try:
                data = sock.recv(10240)
            except socket.timeout:
                break
            try:
                response = json.loads(data)
            except ValueError:
                continue
            if (response.get("message_type") == "machine_status" and response.get("space") == SPACE
                    and response.get("factory") in responses
                    and response.get("cookie") == hashlib.sha256((salt + response["factory"]).encode()).hexdigest()
                    and all(key in response for key in required)):
                responses[response["factory"]]["num_machines"] = response["num_machines"]
                responses[response["factory"]]["machines"][response["machine"]] = response
    sock.close()
    return (sum(len(r["machines"]) for r in responses.values()),
            sum(1 for r in responses.values() if r["machines"]))


def our_machines_query(factories: tuple, timeout: float) -> vacquery.QueryResult:
    settings = Settings(vac_space=SPACE, factory_name=factories[0].name, factories=factories,
                        vacquery_address=factories[0].address, vacquery_port=PORT,
                        udp_timeout_seconds=timeout)
    return asyncio.run(vacquery.query_machines(settings, client=vacquery.COMMAND_CLIENT))


def run_machines(context, count: int, slots: int, repeats: int) -> dict:
    factories = space(count)
    ready, stop, silence = context.Event(), context.Event(), context.Event()
    server = context.Process(target=serve_space, args=(count, slots, ready, stop, silence), daemon=True)
    server.start()
    results: dict = {}
    try:
        if not ready.wait(120):
            raise RuntimeError("responders did not start")
        times, complete = [], True
        for _ in range(repeats):
            started = time.perf_counter()
            result = our_machines_query(factories, 10.0)
            times.append(time.perf_counter() - started)
            complete = complete and result.complete and len(result.reports) == count * slots
        results["ours"] = (statistics.median(times), max(times), complete)
        started = time.perf_counter()
        machines, heard = classic_machines_query(factories, factories[0].address)
        results["classic"] = (time.perf_counter() - started, machines == count * slots and heard == count)
        silence.set()
        time.sleep(0.5)
        started = time.perf_counter()
        result = our_machines_query(factories, 2.0)
        results["ours_silent"] = (time.perf_counter() - started, len(result.silent), len(result.reports))
        started = time.perf_counter()
        machines, heard = classic_machines_query(factories, factories[0].address)
        results["classic_silent"] = (time.perf_counter() - started, count - heard, machines)
    finally:
        stop.set()
        server.join(30)
        if server.is_alive():
            server.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="load per responder measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="queries outstanding at once")
    parser.add_argument("--factories", type=int, default=500)
    parser.add_argument("--slots", type=int, default=8, help="machines per factory")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    context = multiprocessing.get_context("fork")

    print(f"1. responder, machinetypes queries, {MACHINETYPES} machinetypes, "
          f"{args.concurrency} outstanding, {args.seconds:.0f} s each")
    ours = run_throughput(context, serve_responder, RESPONDER_HOST, args.seconds, args.concurrency)
    classic = run_throughput(context, serve_classic_responder, CLASSIC_HOST, args.seconds, args.concurrency)
    for name, result in (("vacd responder", ours), ("classic design", classic)):
        print(f"   {name:15s} {result['rate']:8.0f} queries/s  p50 {result['p50_ms']:6.2f} ms  "
              f"p99 {result['p99_ms']:6.2f} ms  ({result['done']} done, {result['lost']} lost)")
    print(f"   throughput ratio {ours['rate'] / classic['rate']:.1f}x; target >= {TARGET_RATE:.0f}/s "
          f"and p99 < {TARGET_P99_MS} ms: "
          f"{'met' if ours['rate'] >= TARGET_RATE and ours['p99_ms'] < TARGET_P99_MS else 'NOT met'}")

    print(f"2. vac machines across {args.factories} loopback responders, {args.slots} machines each")
    results = run_machines(context, args.factories, args.slots, args.repeats)
    median, worst, complete = results["ours"]
    classic_time, classic_complete = results["classic"]
    print(f"   vacd client     {median:6.3f} s median, {worst:.3f} s worst of {args.repeats} "
          f"({'complete' if complete else 'INCOMPLETE'})")
    print(f"   classic client  {classic_time:6.3f} s ({'complete' if classic_complete else 'INCOMPLETE'})")
    print(f"   speed-up {classic_time / median:.1f}x; target < {TARGET_MACHINES_S} s: "
          f"{'met' if median < TARGET_MACHINES_S and complete else 'NOT met'}")
    elapsed, silent, reports = results["ours_silent"]
    print(f"   with 5 stopped: vacd client (-t 2) {elapsed:.2f} s, {silent} named silent, {reports} machines")
    elapsed, silent, machines = results["classic_silent"]
    print(f"   with 5 stopped: classic client     {elapsed:.2f} s, {silent} silent, {machines} machines")


if __name__ == "__main__":
    main()

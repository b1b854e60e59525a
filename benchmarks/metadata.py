"""GET throughput and latency of the metadata/MJF services against the classic design.

Target (ARCHITECTURE.md §8): >= 2,000 req/s and p99 < 10 ms at 50 concurrent clients.

Servers, each in its own process, over the same machine directories in a temporary state dir:

* vacd: ``vac.services.metadata.start_services`` (aiohttp on one event loop), metadata on 127.0.0.2 and
  MJF on 127.0.0.3.
* classic: a stdlib ``http.server`` with ``ForkingMixIn`` (one fork per request, HTTP/1.0, the
  design of classic vacd-metadata/vacd-mjf) on 127.0.0.4, serving the same two documents from
  the same files.

Fifty clients, client N bound to 127.0.0.(10+N) and so acting as the machine in slot N, each
send requests back to back for a fixed time. vacd is measured both with a new connection per
request (as cloud-init and DIRAC's MJF reader do) and with keep-alive; the classic server closes
every connection. Run: ``python benchmarks/metadata.py [--seconds 5] [--clients 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import logging
import multiprocessing
import os
import socketserver
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vac.core.config import Machinetype, Settings  # noqa: E402
from vac.core.model import Machine, MachineState  # noqa: E402
from vac.services import metadata  # noqa: E402
from vac.services.metadata import MachineContext  # noqa: E402

METADATA_HOST, MJF_HOST, CLASSIC_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.4"
META_PATH = "/openstack/latest/meta_data.json"
MJF_PATH = "/jobfeatures/wall_limit_secs"
SETTINGS = Settings(vac_space="space.example.org", factory_name="factory.example.org",
                    hs06_per_processor=10.0)
TARGET_RATE, TARGET_P99_MS = 2000.0, 10.0


def loopback_slot(address: str):
    parts = address.split(".")
    if parts[:3] != ["127", "0", "0"] or int(parts[3]) < 10:
        return None
    return int(parts[3]) - 10


def make_state(root: Path, clients: int) -> dict[int, MachineContext]:
    contexts = {}
    for slot in range(1, clients + 1):
        machine = Machine(uuid=f"00000000-0000-4000-8000-{slot:012d}",
                          name=f"factory-{slot:02d}.example.org", slot=slot, machinetype="bench",
                          machine_model="cernvm4", processors=1, created=1_700_000_000,
                          deadline=1_700_086_400, state=MachineState.RUNNING)
        directory = root / "machines" / machine.directory_name
        (directory / "joboutputs").mkdir(parents=True)
        metadata.write_mjf(directory, *metadata.mjf_features(
            machine, SETTINGS, Machinetype(name="bench"), 1_700_000_000))
        (directory / "root_public_key").write_text("ssh-rsa AAAAB3NzaC1yc2E root@factory")
        (directory / "user_data").write_text("#!/bin/sh\n" + "x" * 4000)
        contexts[slot] = MachineContext(machine, directory)
    return contexts


# --- the servers -----------------------------------------------------------------------------


def run_vacd(root: str, contexts: dict[int, MachineContext], ready) -> None:
    logging.basicConfig(filename=os.path.join(root, "vacd.log"), level=logging.INFO)

    async def main() -> None:
        services = await metadata.start_services(
            SETTINGS, contexts.get, metadata_address=METADATA_HOST, mjf_address=MJF_HOST,
            port=0, slot_for_address=loopback_slot, slots=len(contexts))
        ready.send((services.metadata_url, services.mjf_url))
        await asyncio.Event().wait()  # until terminated

    asyncio.run(main())


class ClassicHandler(http.server.BaseHTTPRequestHandler):
    """The classic way: map the source address to the machine directory, read files, reply."""

    root = Path()

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        slot = loopback_slot(self.client_address[0])
        directories = list((self.root / "machines").glob(f"*_factory-{slot:02d}.example.org"))
        if slot is None or not directories:
            self.send_error(404)
            return
        directory = directories[0]
        if self.path == META_PATH:
            body = json.dumps({
                "uuid": (directory / "jobfeatures" / "job_id").read_text(),
                "name": directory.name.split("_", 2)[2],
                "hostname": directory.name.split("_", 2)[2],
                "availability_zone": SETTINGS.factory_name,
                "public_keys": {"0": (directory / "root_public_key").read_text()},
                "meta": {"machinefeatures": "http://169.254.169.253/machinefeatures",
                         "jobfeatures": "http://169.254.169.253/jobfeatures",
                         "joboutputs": "http://169.254.169.253/joboutputs",
                         "machinetype": "bench"}}).encode()
        elif self.path.startswith("/jobfeatures/"):
            body = (directory / "jobfeatures" / self.path.split("/")[2]).read_bytes()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server API)
        pass  # classic logged to a file per request; keep the comparison about serving


class ClassicServer(socketserver.ForkingMixIn, http.server.HTTPServer):
    request_queue_size = 256  # the classic listen backlog


def run_classic(root: str, ready) -> None:
    ClassicHandler.root = Path(root)
    server = ClassicServer((CLASSIC_HOST, 0), ClassicHandler)
    ready.send(f"http://{CLASSIC_HOST}:{server.server_address[1]}")
    server.serve_forever()


# --- the load ----------------------------------------------------------------------------------


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
               path: str, keep_alive: bool) -> bool:
    connection = "keep-alive" if keep_alive else "close"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n"
                 .encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")


async def _client(slot: int, base: str, path: str, keep_alive: bool, stop_at: float,
                  interval: float, latencies: list[float], errors: list[int]) -> None:
    """Requests back to back (interval 0) or one every ``interval`` seconds (open loop).

    Paced latencies count from the scheduled send time, so a server that falls behind shows it
    (no coordinated omission).
    """
    host, port = base.split("//")[1].split(":")
    loop = asyncio.get_running_loop()
    streams = None
    scheduled = loop.time() + interval * slot / 50
    while scheduled < stop_at and loop.time() < stop_at and len(latencies) < 2_000_000:
        if interval:
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
        started = scheduled if interval else loop.time()
        try:
            if streams is None:
                streams = await asyncio.open_connection(host, int(port),
                                                        local_addr=(f"127.0.0.{10 + slot}", 0))
            ok = await _one(*streams, host, path, keep_alive)
            if not keep_alive:
                streams[1].close()
                streams = None
        except (OSError, asyncio.IncompleteReadError):
            ok, streams = False, None
        latencies.append(loop.time() - started)
        if not ok:
            errors.append(slot)
        scheduled = scheduled + interval if interval else loop.time()
    if streams is not None:
        streams[1].close()


async def _load(base: str, path: str, keep_alive: bool, clients: int, seconds: float,
                rate: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors: list[int] = []
    interval = clients / rate if rate else 0.0
    stop_at = asyncio.get_running_loop().time() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(_client(slot, base, path, keep_alive, stop_at, interval, latencies,
                                   errors) for slot in range(1, clients + 1)))
    return len(latencies) / (time.perf_counter() - started), latencies, len(errors)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes and their reaped children (classic forks)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def measure(label: str, base: str, path: str, keep_alive: bool, clients: int, seconds: float,
            rate: float, server_pid: int) -> float:
    cpu_before, started = _cpu_seconds([server_pid]), time.perf_counter()
    achieved, latencies, errors = asyncio.run(
        _load(base, path, keep_alive, clients, seconds, rate))
    cpu_seconds = _cpu_seconds([server_pid]) - cpu_before
    cpu = cpu_seconds / (time.perf_counter() - started) * 100
    cpu_per_request = cpu_seconds / len(latencies) * 1e6
    quantiles = statistics.quantiles(latencies, n=100)
    p50, p99 = quantiles[49] * 1000, quantiles[98] * 1000
    verdict = ""
    if rate and label.startswith("vacd"):
        met = achieved >= 0.95 * rate and p99 < TARGET_P99_MS and not errors
        verdict = "meets target" if met else "BELOW TARGET"
    offered = f"{rate:.0f}" if rate else "max"
    print(f"{label:<40} {offered:>7} {achieved:>8.0f} {p50:>7.2f} {p99:>8.2f} {cpu:>6.0f}% "
          f"{cpu_per_request:>6.0f} {errors:>6}  {verdict}")
    return achieved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (<= 200)")
    args = parser.parse_args()
    clients = max(1, min(args.clients, 200))
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="vac-bench-metadata-") as root:
        contexts = make_state(Path(root), clients)
        vacd_pipe, vacd_end = context.Pipe()
        classic_pipe, classic_end = context.Pipe()
        processes = [context.Process(target=run_vacd, args=(root, contexts, vacd_end)),
                     context.Process(target=run_classic, args=(root, classic_end))]
        for process in processes:
            process.start()
        try:
            if not (vacd_pipe.poll(20) and classic_pipe.poll(20)):
                raise SystemExit("servers did not start")
            metadata_url, mjf_url = vacd_pipe.recv()
            classic_url = classic_pipe.recv()
            vacd_pid, classic_pid = processes[0].pid, processes[1].pid
            print(f"{clients} concurrent clients, {args.seconds:g} s per row; target: "
                  f">= {TARGET_RATE:.0f} req/s with p99 < {TARGET_P99_MS:g} ms")
            print("offered 'max' = back to back (closed loop); a number = paced (open loop), "
                  "latency from the scheduled send time; CPU, us/req = server process CPU time")
            for path, base in ((META_PATH, metadata_url), (MJF_PATH, mjf_url)):
                print(f"\nGET {path}")
                print(f"{'server':<40} {'offered':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>8} "
                      f"{'CPU':>7} {'us/req':>6} {'errors':>6}")
                rows = (("vacd aiohttp, new connection each", False),
                        ("vacd aiohttp, keep-alive", True))
                achieved = {}
                for label, keep_alive in rows:
                    for rate in (TARGET_RATE, 0.0):
                        achieved[keep_alive, rate] = measure(
                            label, base, path, keep_alive, clients, args.seconds, rate, vacd_pid)
                classic_label = "classic forking http.server, HTTP/1.0"
                classic = measure(classic_label, classic_url, path, False, clients,
                                  args.seconds, 0.0, classic_pid)
                measure(classic_label, classic_url, path, False, clients, args.seconds,
                        TARGET_RATE, classic_pid)
                print(f"max throughput ratio vacd/classic (new connections): "
                      f"{achieved[False, 0.0] / classic:.1f}x")
        finally:
            for process in processes:
                process.terminate()
                process.join(10)


if __name__ == "__main__":
    main()

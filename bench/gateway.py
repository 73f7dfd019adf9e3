"""Egress gateway overhead: a 1 KB HTTP response from a local upstream, direct vs through the gateway.

Three processes, so no two share a GIL: the upstream (an asyncio server answering
every request with 1 KB), the gateway (this process, its own loop thread, with
allowlist, address check and audit into a real SQLite store on), and the client.
The client speaks keep-alive HTTP/1.1 over TCP to the upstream (direct) or over
the session's unix socket as a proxy client (absolute-form URL).

- latency: one connection, WARMUP then REQUESTS sequential requests; median and p99;
- throughput: CONCURRENCY connections for DURATION_S seconds; requests per second.

The upstream is reached as ``bench.test`` through a static resolver, its exact
(127.0.0.1, port) pair being the one private target the gateway lets through.
Targets: added median latency < 2 ms; >= 1,000 requests/s through one gateway.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from codeevolver.gateway import EgressGateway, static_resolver
from codeevolver.store import Store

BODY = b"x" * 1024
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
WARMUP, REQUESTS = 200, 2000
CONCURRENCY, DURATION_S = 16, 3.0
ADDED_MS, MIN_RPS = 2.0, 1000.0


def upstream(ports: Any) -> None:
    """The upstream process: answer each request head with RESPONSE, keep-alive."""

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                self.buffer = self.buffer[end + 4 :]
                self.transport.write(RESPONSE)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def _open(target: str | tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(target, str):
        return await asyncio.open_unix_connection(target)
    return await asyncio.open_connection(*target)


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:200]!r}")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    if len(await reader.readexactly(length)) != len(BODY):
        raise RuntimeError("short body")


async def _measure(target: str | tuple[str, int], request: bytes) -> dict[str, float]:
    reader, writer = await _open(target)
    for _ in range(WARMUP):
        await _one(reader, writer, request)
    times = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        await _one(reader, writer, request)
        times.append((time.perf_counter() - started) * 1000)
    writer.close()
    times.sort()

    count = 0
    deadline = time.perf_counter() + DURATION_S

    async def worker() -> None:
        nonlocal count
        r, w = await _open(target)
        while time.perf_counter() < deadline:
            await _one(r, w, request)
            count += 1
        w.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    return {
        "median_ms": statistics.median(times),
        "p99_ms": times[int(len(times) * 0.99)],
        "rps": count / elapsed,
        "requests": WARMUP + REQUESTS + count,
    }


def client(target: str | tuple[str, int], request: bytes, results: Any) -> None:
    """The client process: latency, then throughput, put on ``results``."""
    results.put(asyncio.run(_measure(target, request)))


def run_client(ctx: Any, target: str | tuple[str, int], request: bytes) -> dict[str, float]:
    results = ctx.Queue()
    proc = ctx.Process(target=client, args=(target, request, results))
    proc.start()
    out = results.get(timeout=300)
    proc.join()
    return out


def main() -> int:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=upstream, args=(ports,), daemon=True)
    server.start()
    port = ports.get(timeout=30)
    print(f"machine: {os.cpu_count()} cores, 1-minute load average {os.getloadavg()[0]:.1f} at start")
    print(f"1 KB response; latency: {REQUESTS} sequential requests; throughput: {CONCURRENCY} connections,", end=" ")
    print(f"{DURATION_S:g} s")

    direct = run_client(ctx, ("127.0.0.1", port), b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n")
    with tempfile.TemporaryDirectory(prefix="codeevolver-bench-gw-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'runs.db'}")
        run_id = store.create_run({}, tmp, "bench", 0)
        gateway = EgressGateway(
            audit=store.add_audit,
            resolver=static_resolver({"bench.test": ["127.0.0.1"]}),
            trusted_targets=[("127.0.0.1", port)],
        )
        with gateway:
            session = gateway.open_session("bench", run_id=run_id, allow=[f"bench.test:{port}", "*.example.com"])
            request = f"GET http://bench.test:{port}/ HTTP/1.1\r\nHost: bench.test:{port}\r\n\r\n".encode()
            proxied = run_client(ctx, str(session.socket_path), request)
            assert gateway.flush(120)
            audited = len(store.audit(run_id))
            failures = gateway.audit_failures
        store.close()
    server.kill()

    added = proxied["median_ms"] - direct["median_ms"]
    print(f"{'':10} {'median':>9} {'p99':>9} {'req/s':>9}")
    for name, r in (("direct", direct), ("gateway", proxied)):
        print(f"{name:10} {r['median_ms']:7.3f}ms {r['p99_ms']:7.3f}ms {r['rps']:9.0f}")
    print(
        f"{'ratio':10} {proxied['median_ms'] / direct['median_ms']:8.1f}x {'':9} {proxied['rps'] / direct['rps']:8.2f}x"
    )
    print(f"audit rows written: {audited} of {int(proxied['requests'])} requests, {failures} failures")
    ok_latency, ok_rps = added < ADDED_MS, proxied["rps"] >= MIN_RPS
    print(f"added median latency {added:.3f} ms, target < {ADDED_MS:g} ms: {'ok' if ok_latency else 'MISSED'}")
    print(f"through the gateway {proxied['rps']:.0f} req/s, target >= {MIN_RPS:,.0f}: {'ok' if ok_rps else 'MISSED'}")
    complete = audited == int(proxied["requests"]) and failures == 0
    if not complete:
        print("audit incomplete: MISSED")
    return 0 if ok_latency and ok_rps and complete else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Memory per idle client: opens N client connections to a running redcloak,
sends PING on each and waits for +PONG (so every client is served, with an
upstream connection), holds them all, and reports redcloak's resident memory
before and after, per client, and its open file descriptors. With
--quiet-for S it then waits S seconds (clients on clean connections give
theirs back after upstream.release_idle_after), PINGs 1% of the clients again
and reports once more.

    python3 scripts/idle-clients.py --port 7380 --pid "$(pgrep -f 'redcloak serve')" \\
        --clients 1000 [--quiet-for 8]

Each client costs this process one file descriptor and redcloak two while it
holds an upstream connection: raise `ulimit -n` to match.
"""

import argparse
import asyncio
import os
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def ping(reader, writer):
    writer.write(b"PING\r\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 60)
    if line != b"+PONG\r\n":
        raise RuntimeError(f"expected +PONG, got {line!r}")


async def open_client(port, clients, attempts=50):
    for attempt in range(attempts):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await ping(reader, writer)
            clients.append((reader, writer))
            return
        except (OSError, asyncio.TimeoutError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2)


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="redcloak's pid")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--quiet-for", type=float, default=0)
    parser.add_argument("--concurrency", type=int, default=200, help="connects at once")
    args = parser.parse_args()

    before = rss_kib(args.pid)
    clients = []
    started = time.time()
    limit = asyncio.Semaphore(args.concurrency)

    async def one():
        async with limit:
            await open_client(args.port, clients)

    await asyncio.gather(*(one() for _ in range(args.clients)))
    took = time.time() - started
    await asyncio.sleep(2)
    held = rss_kib(args.pid)
    print(
        f"clients={len(clients)} all served (PONG) in {took:.1f}s; "
        f"redcloak RSS {before / 1024:.1f} MiB before, {held / 1024:.1f} MiB with them: "
        f"{(held - before) / len(clients):.1f} KiB per client; {open_fds(args.pid)} fds"
    )
    if args.quiet_for:
        await asyncio.sleep(args.quiet_for)
        fds = open_fds(args.pid)
        again = clients[:: max(1, len(clients) // 100)]
        await asyncio.gather(*(ping(r, w) for r, w in again))
        print(
            f"after {args.quiet_for:.0f}s quiet: {fds} fds; {len(again)} clients PINGed "
            f"again and served; RSS {rss_kib(args.pid) / 1024:.1f} MiB"
        )
    for _, writer in clients:
        writer.close()


asyncio.run(main())
